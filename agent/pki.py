"""The cluster PKI: one CA per cluster and one certificate per agent.

An agent's identity is its certificate: CN = agent name (and a SAN DNS name = agent name, so that TLS
hostname checks can use the name too). Peers learn each other's names from certificates, never from what a
message claims.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def cert_agent_name(cert: x509.Certificate) -> str | None:
    """The agent name a certificate carries (its subject CN), or None without exactly one string CN."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        return None  # several CNs would make the identity ambiguous: no name rather than a guess
    value = attributes[0].value
    return value if isinstance(value, str) and value else None
