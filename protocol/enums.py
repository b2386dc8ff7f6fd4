"""Named values of the kext protocol (kext-contract C2, C4). Only the codecs see raw integers."""

from __future__ import annotations

from enum import IntEnum

#: What the Version ioctl answers: [major, minor, revision, build]. Portmaster needs major >= 2.
INTERFACE_VERSION: bytes = bytes([2, 1, 0, 0])


class Verdict(IntEnum):
    UNDECIDED = 0
    UNDETERMINABLE = 1
    ACCEPT = 2
    PERMANENT_ACCEPT = 3
    BLOCK = 4
    PERMANENT_BLOCK = 5
    DROP = 6
    PERMANENT_DROP = 7
    REDIRECT_NAME_SERVER = 8
    REDIRECT_TUNNEL = 9
    FAILED = 10
    REDIRECT_SPLIT_TUNNEL = 11

    @property
    def kext_name(self) -> str:
        return _VERDICT_NAMES[self]

    @property
    def is_permanent(self) -> bool:
        """Enforced locally on every later packet, without asking Portmaster again."""
        return self not in _TEMPORARY

    @property
    def is_redirect(self) -> bool:
        return self in _REDIRECTS

    @property
    def passes(self) -> bool:
        """Whether the packet that received this verdict is let through (possibly rewritten)."""
        return self in _PASSING


_VERDICT_NAMES = {
    Verdict.UNDECIDED: "Undecided",
    Verdict.UNDETERMINABLE: "Undeterminable",
    Verdict.ACCEPT: "Accept",
    Verdict.PERMANENT_ACCEPT: "PermanentAccept",
    Verdict.BLOCK: "Block",
    Verdict.PERMANENT_BLOCK: "PermanentBlock",
    Verdict.DROP: "Drop",
    Verdict.PERMANENT_DROP: "PermanentDrop",
    Verdict.REDIRECT_NAME_SERVER: "RedirectNameServer",
    Verdict.REDIRECT_TUNNEL: "RedirectTunnel",
    Verdict.FAILED: "Failed",
    Verdict.REDIRECT_SPLIT_TUNNEL: "RedirectSplitTunnel",
}
_TEMPORARY = frozenset({Verdict.UNDECIDED, Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP})
_REDIRECTS = frozenset(
    {Verdict.REDIRECT_NAME_SERVER, Verdict.REDIRECT_TUNNEL, Verdict.REDIRECT_SPLIT_TUNNEL}
)
_PASSING = _REDIRECTS | {Verdict.ACCEPT, Verdict.PERMANENT_ACCEPT}


class CommandType(IntEnum):
    SHUTDOWN = 0
    VERDICT = 1
    UPDATE_V4 = 2
    UPDATE_V6 = 3
    CLEAR_CACHE = 4
    GET_LOGS = 5
    GET_BANDWIDTH_STATS = 6
    PRINT_MEMORY_STATS = 7
    CLEAN_ENDED_CONNECTIONS = 8

    @property
    def kext_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


class InfoType(IntEnum):
    LOG_LINE = 0
    CONNECTION_IPV4 = 1
    CONNECTION_IPV6 = 2
    CONNECTION_END_EVENT_V4 = 3
    CONNECTION_END_EVENT_V6 = 4
    BANDWIDTH_STATS_V4 = 5
    BANDWIDTH_STATS_V6 = 6

    @property
    def kext_name(self) -> str:
        return _INFO_NAMES[self]


_INFO_NAMES = {
    InfoType.LOG_LINE: "LogLine",
    InfoType.CONNECTION_IPV4: "ConnectionIpv4",
    InfoType.CONNECTION_IPV6: "ConnectionIpv6",
    InfoType.CONNECTION_END_EVENT_V4: "ConnectionEndEventV4",
    InfoType.CONNECTION_END_EVENT_V6: "ConnectionEndEventV6",
    InfoType.BANDWIDTH_STATS_V4: "BandwidthStatsV4",
    InfoType.BANDWIDTH_STATS_V6: "BandwidthStatsV6",
}


class Direction(IntEnum):
    OUTBOUND = 0
    INBOUND = 1


class PayloadLayer(IntEnum):
    #: The payload is the full IP packet (what kextless always sends).
    NETWORK = 3
    #: The payload starts at the transport header (the kext's ALE layer).
    TRANSPORT = 4


class Severity(IntEnum):
    TRACE = 1
    DEBUG = 2
    INFO = 3
    WARNING = 4
    ERROR = 5
    CRITICAL = 6
    DISABLED = 7


class IpProtocol(IntEnum):
    """The IANA protocol numbers kextless treats specially; others travel as plain ints."""

    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
