"""A faithful emulator of the minkms server and CLI, and kmlab, a local lab launcher.

Development and test tool only: never shipped in kmagent's packages.
"""
