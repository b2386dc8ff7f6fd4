"""`kextless bench`: the hot path measured against a baseline from the same run (issue 9).

`runner` orchestrates (namespaces, instances, rounds, output), `measures` holds one function per
figure, `workloads` the tiny programs that make the traffic, `summary` the pure statistics and
the Markdown table, `plot` the connect-latency PNG, `netns` the throw-away namespace pairs and
`system` the kextless instances under test with their answering client.
"""
