"""The `heal-variant` flow: one variant healed by one method, as its own run on the `gpu` pool.

    prune-and-heal (holds its gpu slots) ── evaluates every unhealed variant ──► releases them
        └─ run_deployment(heal-variant/default) × variants, in parallel ─► each: gpu slots, heal
    prune-and-heal ── takes its slots again ─► evaluates the healed variants in its own process

Healing takes hours per variant on a GPU; as separate runs, one model's variants heal side by
side on as many GPUs as the `gpu` limit and the pool's workers allow. Chosen with
`heal.dispatch = "deployment"` (default "inline": the demo and the tests run without a
deployment). The parent gives its slots back while it waits, so its children can always take
them (tasks/gpus.py); it still occupies its own worker, so the pool needs a second GPU worker.
"""

from __future__ import annotations

from types import SimpleNamespace

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerprune.config import HealMethod, HealSpec, ModelSpec
from layerprune.config.worker import check_for_worker
from layerprune.store.remote import check_reachable
from layerprune.store.artifacts import ArtifactStore
from tasks.children import run_child
from tasks.version import check_deployed_version
from tasks.gpus import gpu_job, gpu_slots
from tasks.heal import STAGE, heal_variant

HEAL_DEPLOYMENT = "heal-variant/default"  # deployments/prefect.yaml


# Not persisted: the parent reads the heal stage's manifest from the artifact store (run_heal).
@flow(name="heal-variant", log_prints=True, persist_result=False)
def heal_one(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
             spec: HealSpec, method: HealMethod = "lora") -> dict:
    """Heal the variant `recipe` of `model` by `method` (tasks.heal.heal_variant); its
    manifest."""
    check_deployed_version()
    check_for_worker(SimpleNamespace(model=model, heal=spec, artifacts=store_root))
    check_reachable(store_root)
    with gpu_slots():
        return heal_variant(store_root, model, model_info, recipe, spec, method)


def heal_key(model: ModelSpec, model_info: dict, recipe: dict, spec: HealSpec,
             method: str) -> str:
    """The heal stage's key for this variant: the address its manifest has in the store."""
    return heal_variant.key({"model": model, "model_info": model_info, "recipe": recipe,
                             "spec": spec, "method": method})


@task(name="dispatch-heal", task_run_name="dispatch-heal-{label}", cache_policy=NO_CACHE)
def run_heal(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
             spec: HealSpec, method: str, gpu_count: int, label: str) -> dict:
    """Run `heal-variant/default` for one variant and wait; the heal stage's manifest, read from
    the store under the key this process computes (no Prefect result is read back)."""
    key = heal_key(model, model_info, recipe, spec, method)
    run = run_child(HEAL_DEPLOYMENT, {
        "store_root": store_root, "model": model.model_dump(mode="json"),
        "model_info": model_info, "recipe": recipe, "spec": spec.model_dump(mode="json"),
        "method": method},
        f"heal {label}", work=f"heal-{key}", **gpu_job(gpu_count))
    manifest = ArtifactStore(store_root).manifest(STAGE, key)
    if manifest is None:
        raise RuntimeError(f"heal {label}: flow run {run.name} ({run.id}) completed but "
                           f"{STAGE}/{key} is not complete in {store_root}")
    get_run_logger().info("heal %s: flow run %s completed", label, run.name)
    return manifest


def heal_in_deployments(store_root: str, model: ModelSpec, model_info: dict,
                        jobs: list[tuple[dict, str]], spec: HealSpec,
                        gpu_count: int) -> list[dict]:
    """Heal every (recipe, method) as its own `heal-variant` run, all at once; manifests in
    order."""
    futures = [run_heal.submit(store_root, model, model_info, r, spec, method, gpu_count,
                               f"{r['meta']['strategy']}-n{r['meta']['n']}-{method}")
               for r, method in jobs]
    return [f.result() for f in futures]
