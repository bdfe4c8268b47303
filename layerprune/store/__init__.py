"""store/: where artifacts live, knowing nothing of models (the bottom wing).

- `artifacts`: the artifact store (`<root>/<stage>/<key>/`, local or S3), exclusive publishing;
- `manifests`: stage keys and the manifest that commits a stage, checked against its files;
- `remote`: S3 through fsspec with bounded retries, and one `StoreUnavailable` error;
- `leases`: leased scratch directories that a dead owner loses;
- `maintenance`: `layerprune gc` and `layerprune verify`;
- `files`: atomic writes, checksums, disk-full errors, the local cache directory.

May import: errors.
"""
