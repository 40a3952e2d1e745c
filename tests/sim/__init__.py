"""The deterministic simulator of the peer protocol (DESIGN §8): `python -m tests.sim --help`."""
