"""kmagent: the node agent that heals AIStor Key Manager (minkms) clusters."""

__version__ = "0.1.0"
