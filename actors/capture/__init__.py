"""The capture actor: owns the namespace's divert handle, holds packets, enforces verdicts."""
