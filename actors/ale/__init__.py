"""ALE: the decision state machine (the kext's connection cache and id cache, verdicts)."""
