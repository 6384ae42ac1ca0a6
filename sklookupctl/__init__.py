"""sklookupctl: steer protocols, prefixes and port ranges to one socket with BPF sk_lookup."""

__version__ = "0.1.0"
