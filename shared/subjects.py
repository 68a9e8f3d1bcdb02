"""Every NATS subject and JetStream bucket iServe uses, in one place.

Subjects are versioned with the ``iserve.v1.`` prefix: a breaking change to a message gets a new
prefix, while compatible changes append fields with defaults (see ``iserve.messages``).

Who talks to whom::

    CLI / loadgen ──model.register──▶ fingerprint ──agent.<id>.profile──▶ gpu-agent ─▶ worker (profile mode)
                                        │  ├─ model.registered (event)
                                        │  └─ profile.done     (event)
    CLI / loadgen ──deploy.request───▶ deployer ──agent.<id>.launch──▶ gpu-agent ─▶ worker (serve mode)
                                        ▲  gpu.load.<agent>.<gpu> (every second, from each agent)
                                        └─ worker.ready / worker.exited (events, from agents and workers)
    CLI / loadgen ──infer (stream)───▶ scheduler (FCFS per deployment) ──worker.<id>.generate──▶ worker
"""

from __future__ import annotations

PREFIX = "iserve.v1"

# --- fingerprint service -------------------------------------------------------------------------
MODEL_REGISTER = f"{PREFIX}.model.register"  # request-reply: RegisterModel -> ModelInfo | ErrorReply
MODEL_REGISTERED = f"{PREFIX}.model.registered"  # event: ModelRegistered
MODEL_GET = f"{PREFIX}.model.get"  # request-reply: GetModel -> ModelInfo | ErrorReply
MODEL_LIST = f"{PREFIX}.model.list"  # request-reply: ListModels -> ModelList
MODEL_UNREGISTER = f"{PREFIX}.model.unregister"  # request-reply: UnregisterModel -> UnregisterReply | ErrorReply
PROFILE_DONE = f"{PREFIX}.profile.done"  # event: ProfileDone
PROFILE_GET = f"{PREFIX}.profile.get"  # request-reply: GetProfile -> ConfigurationMap | ErrorReply

# --- deployer ------------------------------------------------------------------------------------
DEPLOY_REQUEST = f"{PREFIX}.deploy.request"  # request-reply: DeployRequest -> DeployReply | ErrorReply
UNDEPLOY_REQUEST = f"{PREFIX}.deploy.undeploy"  # request-reply: UndeployRequest -> UndeployReply
DEPLOYMENT_LIST = f"{PREFIX}.deploy.list"  # request-reply: ListDeployments -> DeploymentList
DEPLOYMENT_CHANGED = f"{PREFIX}.deploy.changed"  # event: DeploymentChanged

# --- gpu agents and workers ----------------------------------------------------------------------
GPU_LOAD = f"{PREFIX}.gpu.load"  # event prefix: GPU_LOAD.<agent>.<gpu index> carries GpuLoad
GPU_LOAD_ALL = f"{GPU_LOAD}.>"


def gpu_load(agent_id: str, gpu_index: int) -> str:
    return f"{GPU_LOAD}.{agent_id}.{gpu_index}"


def agent_launch(agent_id: str) -> str:
    """request-reply: LaunchWorker -> LaunchReply | ErrorReply"""
    return f"{PREFIX}.agent.{agent_id}.launch"


def agent_stop(agent_id: str) -> str:
    """request-reply: StopWorker -> StopReply | ErrorReply"""
    return f"{PREFIX}.agent.{agent_id}.stop"


def agent_profile(agent_id: str) -> str:
    """request-reply: ProfileJob -> ProfileResult | ErrorReply (runs a profile-mode worker)"""
    return f"{PREFIX}.agent.{agent_id}.profile"


WORKER_READY = f"{PREFIX}.worker.ready"  # event: WorkerReady
WORKER_EXITED = f"{PREFIX}.worker.exited"  # event: WorkerExited
WORKER_HEARTBEAT = f"{PREFIX}.worker.heartbeat"  # event prefix: .<worker id>, WorkerHeartbeat


def worker_heartbeat(worker_id: str) -> str:
    return f"{WORKER_HEARTBEAT}.{worker_id}"


def worker_generate(worker_id: str) -> str:
    """stream: GenerateRequest -> TokenChunk* then Completion | ErrorReply, sent to the reply inbox"""
    return f"{PREFIX}.worker.{worker_id}.generate"


def worker_cancel(worker_id: str) -> str:
    """event: CancelRequest for the request the worker is running"""
    return f"{PREFIX}.worker.{worker_id}.cancel"


# --- scheduler -----------------------------------------------------------------------------------
INFER = f"{PREFIX}.infer"  # stream: InferRequest -> TokenChunk* then Completion | ErrorReply
INFER_CANCEL = f"{PREFIX}.infer.cancel"  # event: CancelRequest
SCHEDULER_STATS = f"{PREFIX}.scheduler.stats"  # request-reply: GetSchedulerStats -> SchedulerStats
SCHEDULER_LOAD = f"{PREFIX}.scheduler.load"  # event, every --publish-load-s: SchedulerLoad

# --- JetStream key-value buckets (durable state) -------------------------------------------------
BUCKET_MODELS = "iserve_models"  # key: model name -> ModelRecord
BUCKET_PROFILES = "iserve_profiles"  # key: "<model>.<gpu type>" -> ConfigurationMap
BUCKET_DEPLOYMENTS = "iserve_deployments"  # key: deployment id -> DeploymentRecord
BUCKET_AUTOSCALER = "iserve_autoscaler"  # key: model name -> AutoscaleState


def kv_updates(bucket: str) -> str:
    """event: every put and delete of a KV bucket, as JetStream stores them (``$KV.<bucket>.<key>``;
    a delete carries the header ``KV-Operation``)"""
    return f"$KV.{bucket}.>"
