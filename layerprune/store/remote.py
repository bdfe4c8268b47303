"""Remote artifact stores: where S3 endpoints, retries, timeouts and reachability are decided.

The artifact store (`layerprune.store.artifacts.ArtifactStore`) runs the same code on a local directory
and on `s3://bucket/prefix`; this module is the one place that turns the standard AWS
environment into fsspec options (`storage_options_from_env`, used by the store and by Prefect's
result storage alike) and that bounds how long a sick endpoint can hold up a stage:

- endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (botocore >= 1.31 reads both too);
- credentials: botocore's usual chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`,
  instance roles). They are never copied into options, flow parameters, blocks or logs.

Attempts. Every S3 request (a HEAD, GET or PUT) is tried at most `LAYERPRUNE_S3_MAX_ATTEMPTS`
times (default 3), by botocore alone, in its "standard" retry mode: backoff with jitter (up to
1 s, then up to 2 s) on connection errors, timeouts, resets, 5xx and throttling (`SlowDown`).
Three attempts ride out a blip or a restarting proxy, then give up while failing the stage is
still cheap (a rerun reuses every completed stage). Other layers would retry on top:

- s3fs retries the same errors again (`S3FileSystem.retries`, 5): 3 x 5 = 15 attempts, so a
  stalled endpoint held a stage for 15 read timeouts (measured). s3fs has no option for it,
  only the class attribute its maintainers point to (fsspec/s3fs discussion #1033), so
  `BoundedS3FileSystem` sets it to 1 and is registered for s3:// (fsspec's documented
  `register_implementation`). The price: a download cut in the middle of its body (after the
  200, where botocore no longer retries) is not resumed; the stage fails and its rerun fetches
  it again.
- botocore's `retries: {"max_attempts": N}` counts *retries*, N + 1 attempts (measured: 3 made
  4); the config uses `total_max_attempts`, which counts the first attempt too.
- aiohttp resends an idempotent request (GET, HEAD, PUT) once by itself when the server resets
  or closes the connection under it (aiohttp.client, `retry_persistent_connection`; no option),
  so a store that drops connections sees 2 requests per attempt, 6 in all; other faults 3.

botocore's standard mode also keeps a retry quota per client (retries spend tokens that
successes earn back): after a long storm of failures in one process an operation may get fewer
attempts than the maximum, never more.

Timeouts. `LAYERPRUNE_S3_CONNECT_TIMEOUT` (default 5 s) per connection attempt: a black-holed
endpoint fails after about 3 x 5 s + backoff, a refused port at once. `LAYERPRUNE_S3_READ_TIMEOUT`
(default 60 s) per wait for the server's next bytes: a slow store still gets a minute to answer
a large PUT; a stalled one fails after about 3 x 60 s + backoff. Tests set both far lower.

Uploads carry `Expect: 100-continue` (botocore adds it to every PUT), and aiohttp waits for the
"100 Continue" with *no* timeout (its read timeout starts once the body is sent): an endpoint
that read the request and never answered held a publish forever (measured). botocore's own HTTP
client waits 1 s for it and then sends the body anyway, and S3 accepts either; so
`BoundedS3FileSystem` drops that header, and a stalled PUT times out like any other request.
"""

from __future__ import annotations

import math
import os

import fsspec

from layerprune.errors import LayerPruneError


class StoreUnavailable(OSError):
    """The artifact store cannot be reached, or its bucket does not exist."""


# The defaults; `s3_client_config()` applies the environment's overrides.
S3_CLIENT_CONFIG: dict = {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"total_max_attempts": 3, "mode": "standard"}}
# env variable -> (botocore config key, type, lowest allowed value)
_OVERRIDES = {"LAYERPRUNE_S3_CONNECT_TIMEOUT": ("connect_timeout", float, 0.01),
              "LAYERPRUNE_S3_READ_TIMEOUT": ("read_timeout", float, 0.01),
              "LAYERPRUNE_S3_MAX_ATTEMPTS": ("total_max_attempts", int, 1)}


def is_remote(root: str) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


def is_s3(root: str) -> bool:
    return str(root).startswith(("s3://", "s3a://"))


def s3_endpoint() -> str | None:
    """The S3 endpoint named by the environment; None means AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client_config() -> dict:
    """botocore client config: the defaults above, with the environment's overrides."""
    config = {**S3_CLIENT_CONFIG, "retries": dict(S3_CLIENT_CONFIG["retries"])}
    for name, (key, kind, lowest) in _OVERRIDES.items():
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < lowest:
            what = "an integer" if kind is int else "a number"
            raise LayerPruneError(f"{name}={raw!r}: must be {what} >= {lowest}")
        if key == "total_max_attempts":
            config["retries"][key] = value
        else:
            config[key] = value
    return config


def storage_options_from_env(root: str, with_endpoint: bool = True) -> dict:
    """fsspec options for `root`: none for local paths; bounded retries and timeouts (and the
    endpoint, unless `with_endpoint=False`) for s3:// roots. Also makes sure s3:// resolves to
    `BoundedS3FileSystem` in this process (module doc)."""
    if not is_s3(root):
        return {}
    register_bounded_s3()
    options: dict = {"config_kwargs": s3_client_config()}
    # botocore would read AWS_ENDPOINT_URL itself; passing it explicitly also keys fsspec's
    # instance cache on it, so a process whose environment changes gets a client for the new
    # endpoint instead of a cached one for the old.
    if with_endpoint and (endpoint := s3_endpoint()):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def max_attempts(storage_options: dict | None) -> int | None:
    """The most attempts one S3 operation gets under these options (module doc); None when
    they do not say (options made elsewhere: botocore's defaults and AWS config apply)."""
    retries = ((storage_options or {}).get("config_kwargs") or {}).get("retries") or {}
    if "total_max_attempts" in retries:
        return int(retries["total_max_attempts"])
    if "max_attempts" in retries:
        return int(retries["max_attempts"]) + 1
    return None


def remote_cause(error: BaseException) -> BaseException | None:
    """The transport or S3 error behind `error` (itself, or one it was raised `from`, as s3fs
    raises its OSErrors from botocore's), or None for errors that did not come from the remote
    store (a local disk, a bug)."""
    from aiohttp import ClientError as HTTPError
    from botocore.exceptions import BotoCoreError, ClientError
    from fsspec.exceptions import FSTimeoutError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (BotoCoreError, ClientError, HTTPError, TimeoutError,
                              FSTimeoutError)):
            return error
        error = error.__cause__
    return None


def attempts_made(error: BaseException, storage_options: dict | None) -> int | None:
    """How often the operation that raised `error` was tried: botocore's own count for an S3
    error answer; else (connection errors, timeouts) the configured maximum, which botocore
    always uses up unless its retry quota ran dry (module doc)."""
    cause = remote_cause(error) or error
    meta = getattr(cause, "response", None) or {}
    retried = (meta.get("ResponseMetadata") or {}).get("RetryAttempts")
    return retried + 1 if isinstance(retried, int) else max_attempts(storage_options)


def unavailable(action: str, root: str, error: BaseException,
                storage_options: dict | None) -> StoreUnavailable:
    """One line that names the store, what was being done (the stage) and how often it was
    tried: "artifacts: publishing distances/ab12 in 's3://b/x' failed after 3 attempts (...)"."""
    return StoreUnavailable(f"artifacts: {action} in {str(root)!r} failed after "
                            f"{_attempts(error, storage_options)} ({_one_line(error)})")


def _attempts(error: BaseException, storage_options: dict | None) -> str:
    n = attempts_made(error, storage_options)
    return "botocore's retries" if n is None else f"{n} attempt{'s' if n != 1 else ''}"


def _one_line(error: BaseException) -> str:
    """`Type: message`, plus the transport error botocore wrapped (its `kwargs["error"]`): a
    reset and a refused port both read "Could not connect to the endpoint URL" otherwise."""
    text = f"{type(error).__name__}: {error}"
    inner = (getattr(remote_cause(error), "kwargs", None) or {}).get("error")
    if isinstance(inner, BaseException) and str(inner) and str(inner) not in text:
        text += f"; {type(inner).__name__}: {inner}"
    return " ".join(text.split())


def check_reachable(root: str) -> None:
    """Fail fast with one clear error if the store under `root` cannot be written to: the local
    directory cannot be created, the endpoint does not answer after the bounded retries, or the
    bucket does not exist. Costs one request (HEAD bucket) for remote stores."""
    options = storage_options_from_env(root)
    fs, path = fsspec.core.url_to_fs(str(root), **options)
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
                               f"{where} after {_attempts(e, options)} ({_one_line(e)})") from e


# --- the s3:// filesystem ----------------------------------------------------------------------
_BOUNDED_S3 = None


def register_bounded_s3() -> type:
    """Make s3:// and s3a:// resolve to `BoundedS3FileSystem` in this process (idempotent).
    Built on first use, so local-only runs never import s3fs (about a second)."""
    global _BOUNDED_S3
    if _BOUNDED_S3 is None:
        from s3fs import S3FileSystem

        class BoundedS3FileSystem(S3FileSystem):
            """s3fs with one retry layer only (botocore's) and no `Expect: 100-continue`
            (module doc: why each)."""

            retries = 1  # s3fs's own attempts per call: 1 = no retries on top of botocore's

            async def set_session(self, *args, **kwargs):
                client = await super().set_session(*args, **kwargs)
                if getattr(self, "_layerprune_hooked", None) is not client:
                    # botocore's documented event system; add_expect_header runs on
                    # before-call.s3 too, so this handler goes last.
                    client.meta.events.register_last("before-call.s3", _drop_expect_header)
                    self._layerprune_hooked = client
                return client

        # Importable by name (pickling, fsspec's JSON form) via the module __getattr__ below.
        BoundedS3FileSystem.__module__ = __name__
        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"
        _BOUNDED_S3 = BoundedS3FileSystem
    for protocol in ("s3", "s3a"):
        if fsspec.registry.get(protocol) is not _BOUNDED_S3:
            fsspec.register_implementation(protocol, _BOUNDED_S3, clobber=True)
    return _BOUNDED_S3


def _drop_expect_header(params, **kwargs):
    params.get("headers", {}).pop("Expect", None)


def __getattr__(name: str):
    if name == "BoundedS3FileSystem":
        return register_bounded_s3()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
