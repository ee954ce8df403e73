"""NBD service: the host-facing protocol (sans-IO codec in proto, Trio server in server)."""
