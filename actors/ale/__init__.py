"""ALE: the decision state machine (connection cache, pending ids, verdicts)."""
