"""The `heal-variant` flow: one variant healed by one method, as its own run on the `gpu` pool.

    prune-and-heal (holds its gpu slots) ── evaluates every unhealed variant ──► frees the model's
        GPU memory, releases its slots
        └─ run_deployment(heal-variant/default) × variants ─► the heal queue of its own GPUs
    prune-and-heal ── takes its slots again ─► evaluates the healed variants in its own process

Chosen with `heal.dispatch = "deployment"` (default "inline": the demo and the tests run without
a deployment). Why it cannot deadlock (docs/operations.md, "Healing as its own runs"): the
parent waits on its children while it occupies its worker, so its children must never need that
worker. workers.sh starts, next to each GPU group's worker (which runs prune-and-heal runs, one
at a time), a reserved heal worker on the same GPUs that polls only that group's heal queue,
`heal-<host>-gpu-<ids>`, and hands it to the group's runs in LAYERPRUNE_HEAL_QUEUE: a parent's
heal children go there, where no prune-and-heal run can ever sit. They run on the GPUs the
parent freed, one after another, so two runs never share a GPU. Elsewhere (a CPU host's worker,
Docker or Kubernetes workers, none of them limited to one run) they go to the deployment's queue
`heal` (k-GPU runs: `gpus-<k>`), which such workers poll with the rest.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from layerprune.config import HealMethod, HealSpec, ModelSpec
from layerprune.config.worker import check_for_worker
from layerprune.store.artifacts import ArtifactStore
from layerprune.store.remote import check_reachable
from tasks.children import run_child
from tasks.gpus import gpu_job, gpu_slots
from tasks.heal import STAGE, heal_variant
from tasks.version import check_deployed_version

HEAL_DEPLOYMENT = "heal-variant/default"  # deployments/prefect.yaml
# Set by deployments/workers.sh in the environment of a GPU group's worker (so of its runs): the
# work queue of the heal worker reserved for that group. Not a job variable: the process pool's
# template refuses per-run env names other than tuning ones, so no run can redirect its heals.
HEAL_QUEUE_ENV = "LAYERPRUNE_HEAL_QUEUE"


def heal_job(gpu_count: int) -> dict:
    """`run_deployment` keywords of a heal-variant run started by this process's run: its
    `gpu_count` job variable, and the queue of the heal worker reserved for this run's GPUs
    ($LAYERPRUNE_HEAL_QUEUE), else the usual routing (the deployment's queue, `gpus-<k>`)."""
    job = gpu_job(gpu_count)
    queue = os.environ.get(HEAL_QUEUE_ENV, "").strip()
    return {**job, "work_queue_name": queue} if queue else job


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
        f"heal {label}", work=f"heal-{key}", **heal_job(gpu_count))
    manifest = ArtifactStore(store_root).manifest(STAGE, key)
    if manifest is None:
        raise RuntimeError(f"heal {label}: flow run {run.name} ({run.id}) completed but "
                           f"{STAGE}/{key} is not complete in {store_root}")
    get_run_logger().info("heal %s: flow run %s completed", label, run.name)
    return manifest


def heal_in_deployments(store_root: str, model: ModelSpec, model_info: dict,
                        jobs: list[tuple[dict, str]], spec: HealSpec,
                        gpu_count: int) -> list[dict]:
    """Heal every (recipe, method) as its own `heal-variant` run, all created at once (on a
    GPU host they queue on this run's reserved heal worker, which takes one at a time);
    manifests in order."""
    futures = [run_heal.submit(store_root, model, model_info, r, spec, method, gpu_count,
                               f"{r['meta']['strategy']}-n{r['meta']['n']}-{method}")
               for r, method in jobs]
    return [f.result() for f in futures]
