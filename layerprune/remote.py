"""Remote artifact stores: where S3 endpoints, retries and reachability checks are decided.

The artifact store (`layerprune.store.ArtifactStore`) runs the same code on a local directory
and on `s3://bucket/prefix`; this module is the one place that turns the standard AWS
environment into fsspec options and that bounds how long an unreachable endpoint can stall a
stage:

- endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (botocore >= 1.31 reads both too);
- credentials: botocore's usual chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`,
  instance roles). They are never copied into options, flow parameters, blocks or logs.
"""

from __future__ import annotations

import os

import fsspec


class StoreUnavailable(OSError):
    """The artifact store cannot be reached, or its bucket does not exist."""


# Why these numbers: botocore's defaults (legacy mode: 5 attempts, 60 s connect timeout each)
# let an unreachable endpoint stall a stage for minutes. 3 attempts with a 5 s connect timeout
# fail in under ~20 s (about 3 s when the port refuses), and a slow PUT of a large checkpoint
# part still gets the usual 60 s to answer.
S3_CLIENT_CONFIG: dict = {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"max_attempts": 3, "mode": "standard"}}


def is_remote(root: str) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


def is_s3(root: str) -> bool:
    return str(root).startswith(("s3://", "s3a://"))


def s3_endpoint() -> str | None:
    """The S3 endpoint named by the environment; None means AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options_from_env(root: str, with_endpoint: bool = True) -> dict:
    """fsspec options for `root`: none for local paths; bounded retries and timeouts (and the
    endpoint, unless `with_endpoint=False`) for s3:// roots."""
    if not is_s3(root):
        return {}
    options: dict = {"config_kwargs": S3_CLIENT_CONFIG}
    # botocore would read AWS_ENDPOINT_URL itself; passing it explicitly also keys fsspec's
    # instance cache on it, so a process whose environment changes gets a client for the new
    # endpoint instead of a cached one for the old.
    if with_endpoint and (endpoint := s3_endpoint()):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def check_reachable(root: str) -> None:
    """Fail fast with one clear error if the store under `root` cannot be written to: the local
    directory cannot be created, the endpoint does not answer after the bounded retries, or the
    bucket does not exist. Costs one request (HEAD bucket) for remote stores."""
    fs, path = fsspec.core.url_to_fs(str(root), **storage_options_from_env(root))
    if not is_remote(root):
        try:
            fs.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"artifacts: cannot create {str(root)!r}: {e}") from e
        return
    bucket = path.split("/", 1)[0]
    try:
        if is_s3(root):  # HEAD bucket (s3fs's exists() turns every error into False)
            fs.call_s3("head_bucket", Bucket=bucket)
        else:
            fs.ls(bucket)
    except FileNotFoundError as e:
        raise StoreUnavailable(f"artifacts: bucket {bucket!r} of {str(root)!r} does not exist; "
                               "create it first") from e
    except PermissionError as e:
        raise StoreUnavailable(f"artifacts: these credentials may not use bucket {bucket!r} "
                               f"of {str(root)!r}") from e
    except Exception as e:  # botocore and aiohttp errors share no useful base class
        where = (s3_endpoint() or "the AWS default") if is_s3(root) else "its endpoint"
        raise StoreUnavailable(f"artifacts: cannot reach the artifact store {str(root)!r} at "
                               f"{where} after bounded retries ({type(e).__name__}: {e})") from e
