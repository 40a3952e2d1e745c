"""The lab's PKI: a thin layer over kmagent's own (`agent.pki`), so there is one implementation.

minkms only speaks TLS, so a lab needs certificates whose SANs match the addresses the nodes listen on and
that chain to a CA every participant trusts. The lab differs from `kmagent pki` only in its file layout
(minkms's `public.crt` / `private.key` in a directory per participant), in reusing an existing CA instead of
refusing, and in choosing the SANs and usages per participant.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from agent import pki
from agent.pki import CA_CERT, CA_KEY, PKIError

__all__ = ["CA_CERT", "CA_KEY", "LEAF_CERT", "LEAF_KEY", "PKIError", "create_ca", "issue"]

LEAF_CERT = "public.crt"
LEAF_KEY = "private.key"


def create_ca(directory: Path, name: str = "kmlab CA") -> tuple[Path, Path]:
    """Create the lab CA once; later calls reuse it so already issued certificates stay valid."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        # Loading validates both files, so a damaged CA is reported here rather than at issue time.
        pki.load_ca(directory)
        return cert_path, key_path
    return pki.init_ca(directory, "kmlab", common_name=name)


def issue(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    ips: list[str],
    dns: list[str],
    server: bool = True,
    client: bool = True,
) -> tuple[Path, Path]:
    """Issue a leaf for one lab participant into `out_dir` (created 0700), replacing any earlier one."""
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise ValueError(f"invalid IP address for {name!r}: {exc}") from None
    ca_cert, ca_key = pki.load_ca(Path(ca_dir))
    now = datetime.datetime.now(datetime.UTC)
    cert, key = pki.build_leaf(
        ca_cert, ca_key, name, now, dns=dns, ips=addresses, server=server, client=client
    )
    out_dir = Path(out_dir)
    pki.make_private_dir(out_dir)
    cert_path, key_path = out_dir / LEAF_CERT, out_dir / LEAF_KEY
    pki.write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path
