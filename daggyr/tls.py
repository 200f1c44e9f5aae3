"""TLS for both ports from one certificate, and client certificates (mTLS).

``tls_cert_file`` and ``tls_key_file`` turn TLS on for REST and gRPC alike;
``tls_client_ca_file`` then requires every client to present a certificate
signed by that CA, on both. The files are read once at start-up: a renewed
certificate takes a restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from daggyr.auth import SecuritySetupError
from daggyr.config import Config

__all__ = ["grpc_credentials", "rest_ssl_context"]


def _no_password() -> bytes:
    # Without this callback OpenSSL would prompt on the terminal for the key's
    # pass phrase, which a service cannot answer.
    raise SecuritySetupError("tls_key_file is encrypted; give an unencrypted key")


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecuritySetupError(
            f"cannot read {key} {path}: {exc.strerror or exc}"
        ) from None


def rest_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The REST server's TLS context, or None when TLS is off."""
    if not config.tls_cert_file or not config.tls_key_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _read("tls_cert_file", config.tls_cert_file)
    _read("tls_key_file", config.tls_key_file)
    try:
        context.load_cert_chain(
            config.tls_cert_file, config.tls_key_file, password=_no_password
        )
    except ssl.SSLError as exc:
        raise SecuritySetupError(
            f"tls_cert_file {config.tls_cert_file} and tls_key_file "
            f"{config.tls_key_file} are not a usable PEM certificate and key: "
            f"{exc.reason or exc}"
        ) from None
    if config.tls_client_ca_file:
        _read("tls_client_ca_file", config.tls_client_ca_file)
        try:
            context.load_verify_locations(cafile=config.tls_client_ca_file)
        except ssl.SSLError as exc:
            raise SecuritySetupError(
                f"tls_client_ca_file {config.tls_client_ca_file} holds no usable "
                f"PEM certificate: {exc.reason or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def grpc_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The gRPC server's TLS credentials, or None when TLS is off.

    Call after ``rest_ssl_context``, which has checked the same files.
    """
    if not config.tls_cert_file or not config.tls_key_file:
        return None
    pair = (
        _read("tls_key_file", config.tls_key_file),
        _read("tls_cert_file", config.tls_cert_file),
    )
    client_ca = None
    if config.tls_client_ca_file:
        client_ca = _read("tls_client_ca_file", config.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
