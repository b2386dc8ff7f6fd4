"""The two languages kextless speaks: the kext's binary wire format toward Portmaster
(`protocol.kext`) and the msgspec message contract between our own actors (`protocol.messages`)."""
