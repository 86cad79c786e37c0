"""Who the gs:// backend is: its google-cloud-storage client and the credentials behind it (a key
file, the emulator's anonymous access, or Application Default Credentials).

Its own module because it is a different concern from the object operations in gcs.py: it runs
once, when a backend is opened, and its failures are setup mistakes (a missing or malformed key
file, no credentials at all) to report before training starts, not storage errors to retry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import google.auth
import requests.adapters
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from neox_train.errors import StorageError, one_line


def _load_credentials(path: str):
    """Credentials from a JSON key file, checked now so that a typo fails before training starts,
    not at the first upload. Service-account keys, and gcloud's authorized-user files. Returns
    (credentials, project or None)."""

    file = Path(path).expanduser()
    if not file.is_file():
        raise StorageError(
            f"credentials file {path} does not exist (expected a service-account JSON key)")
    try:
        info = json.loads(file.read_text())
    except OSError as e:
        raise StorageError(f"credentials file {path} cannot be read ({one_line(e)})") from e
    except ValueError as e:
        raise StorageError(
            f"credentials file {path} is not JSON (expected a service-account JSON key): "
            f"{one_line(e)}") from e
    kind = info.get("type") if isinstance(info, dict) else None
    try:
        if kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(
                info, scopes=storage.Client.SCOPE)
            return creds, info.get("project_id")
        if kind == "authorized_user":
            return user_credentials.Credentials.from_authorized_user_info(
                info, scopes=storage.Client.SCOPE), None
    except (ValueError, KeyError) as e:
        raise StorageError(
            f"credentials file {path} is not a usable {kind} key: {one_line(e)}") from e
    raise StorageError(
        f"credentials file {path} has type {kind!r} (valid: service_account, or authorized_user "
        f"from gcloud; other kinds work through GOOGLE_APPLICATION_CREDENTIALS)"
    )


# Connections kept per host: requests keeps 10 by default, and more concurrent streams than that
# (gcs.MAX_STREAMS slices plus rsync's file workers) would open and drop connections, a WARNING and
# a new handshake each time.
POOL_CONNECTIONS = 32


def _pooled(client: storage.Client) -> storage.Client:
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS)
    for scheme in ("https://", "http://"):
        client._http.mount(scheme, adapter)
    return client


def make_client(url: str, credentials: str | None):
    """The storage client for `url`: the key file `credentials`, else the emulator's anonymous
    access, else Application Default Credentials; a StorageError that says what to fix when none
    is usable."""
    if credentials:
        creds, project = _load_credentials(credentials)
    else:
        creds = project = None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator wants no token; real credentials would try to reach oauth2.googleapis.com.
        return _pooled(storage.Client(
            project=project or os.environ.get("GOOGLE_CLOUD_PROJECT", "neox-emulator"),
            credentials=AnonymousCredentials()))
    if creds is None:
        env = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if env and not Path(env).expanduser().is_file():
            raise StorageError(
                f"credentials file {env} (from GOOGLE_APPLICATION_CREDENTIALS) does not exist")
        try:
            creds, project = google.auth.default(scopes=storage.Client.SCOPE)
        except DefaultCredentialsError as e:
            if env:
                raise StorageError(f"credentials file {env} (from GOOGLE_APPLICATION_CREDENTIALS) "
                                   f"is not usable: {one_line(e)}") from e
            raise StorageError(
                f"no Google Cloud credentials for {url}: pass --credentials FILE (a "
                "service-account JSON key), set GOOGLE_APPLICATION_CREDENTIALS=FILE, or run "
                "`gcloud auth application-default login`"
            ) from e
    # project=None: object operations need none, and the client then skips looking one up.
    return _pooled(storage.Client(project=project, credentials=creds))
