"""The small shared base under broker and actors: where an instance keeps its sockets and
logs (rundir), and how every process logs (logs). Imports nothing of ours but protocol."""
