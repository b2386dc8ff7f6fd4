"""How kextless runs: the command line, the runtime directory and the supervisord setup."""
