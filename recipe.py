"""
The paper's training recipe (docs/paper.md section B), as train.py runs it: TrainConfig and the
paper's two presets, the model built for training under FSDP2, AdamW with HF's weight-decay
rule, and the schedules of learning rate and batches. Our choices:
- Global batch = micro-batch (1 in the paper) x world x accumulation. The sequences of step k
  are positions [k*G, (k+1)*G) of the epoch's permutation (seeded by seed + epoch); sequence i of
  a step goes to rank i % world. So 1 process and N processes see the same batches and, up to
  float rounding, produce the same losses and adapters.
- LR: HF's linear warm-up (ceil(5% of steps) = 16) then cosine to 0; like HF, step 1 runs at lr 0.
  AdamW (0.9, 0.95), eps 1e-8, weight decay 1e-4 on everything but biases and norms; clip 1.0.
- FSDP2: each decoder layer is a group, the root holds embeddings, final norm and head (so tied
  embeddings live in one group). LoRA mode: the frozen base is stored in --dtype (bf16) and the fp32
  adapters stay replicated outside FSDP (ignored_params) with an explicit gradient all-reduce. Full
  mode: fp32 master weights, MixedPrecisionPolicy(bf16 params, fp32 reduce). One mechanism each.
"""
import math
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard)
from torch.distributed.tensor import DTensor, distribute_tensor

from checkpoint import checkpoint_tensors
from common import DTYPES, check_numbers
from lora import SITE_ORDER, adapters, apply_lora, select_layers
from model import Qwen2

# -----------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    model: str = ""             # HF model directory (config.json + safetensors)
    data: str = ""              # s1K-1.1 rows (.jsonl, .parquet), or {"text"} rows packed in blocks
    out: str = "runs/default"   # adapter/ or model/, ckpt/, metrics.jsonl, config.json
    tokenizer: str = ""         # directory with tokenizer.json (default: --model)
    mode: str = "lora"          # lora: rank-r adapters on a frozen base; full: every weight trains
    rank: int = 1               # LoRA rank r: a is (r, in), b is (out, r)
    alpha: float = 16.0         # LoRA alpha; scale = alpha / sqrt(rank) with rsLoRA
    rslora: bool = True         # scale alpha / sqrt(rank) (rsLoRA, the paper's; alpha / rank at 1)
    targets: str = ",".join(SITE_ORDER)  # comma-separated projections to adapt
    layers: str = ""            # "" (all), "0,5,9", "10-20", "10-40:2" (a stride) or "last_third"
    lr: float = 1e-3            # peak learning rate of AdamW (paper: 1e-3 rank-1, 1e-5 full)
    warmup_ratio: float = 0.05  # share of the optimizer steps warmed up linearly; then cosine to 0
    epochs: int = 5             # passes over the data
    global_batch: int = 16      # sequences per optimizer step
    micro_batch: int = 1        # sequences per forward (paper: 1; more: right-padded, loss-masked)
    beta1: float = 0.9          # AdamW's first-moment decay
    beta2: float = 0.95         # AdamW's second-moment decay
    eps: float = 1e-8           # AdamW's epsilon, added to the root of the second moment
    weight_decay: float = 1e-4  # AdamW's decoupled decay per step (times lr), not on biases, norms
    grad_clip: float = 1.0      # largest global L2 norm of the gradient (0: no clipping, as HF)
    block_size: int = 20000     # longer sequences are truncated (and counted)
    dtype: str = "bfloat16"     # compute dtype of the base model
    activation_checkpointing: bool = True  # keep each layer's input only; recompute it in backward
    loss_chunk: int = 1024      # rows of logits at a time in the loss
    seed: int = 42              # seeds the data order and the adapters' init (same for any world)
    save_every: int = 0         # checkpoint every N steps (0: by --save-minutes only)
    save_minutes: float = 20.0  # also checkpoint when this much wall time passed since the last
    #                             save (0: never by time); and always on SIGINT / SIGTERM
    max_steps: int = 0          # stop after this many steps (0: the full schedule); for smoke tests
    cpu_offload: bool = False   # full mode: FSDP2 keeps fp32 weights, gradients and AdamW state in
    #                             host memory (66 GB per GPU at 32B on 8 GPUs) and the optimizer
    #                             steps on the CPU: what fits the full finetune on 8x80 GB
    resume: bool = False        # continue from the newest checkpoint in out/ckpt
    overwrite: bool = False     # start over in an --out that holds an earlier run (its files only)
    dry_run: bool = False       # print the plan (steps, memory per GPU of every stage) and stop
    world_size: int = 0         # with --dry-run: plan for this many GPUs (0: the processes running)
    gpu_gb: float = 80.0        # with --dry-run: memory of one GPU in GB (1e9 bytes), for the plan
    preset: str = ""            # the paper's settings: s1.1-rank1-32b or s1.1-full-32b

    # ranges of the numbers (common.RANGES); --grad-clip 0 is no clipping, as HF reads it
    RANGES = dict(rank="positive", epochs="positive", global_batch="positive",
                  micro_batch="positive", block_size="positive", loss_chunk="positive",
                  lr="positive", alpha="positive", eps="positive", weight_decay="nonnegative",
                  grad_clip="nonnegative", save_every="nonnegative", save_minutes="nonnegative",
                  max_steps="nonnegative", warmup_ratio="unit", beta1="below_one",
                  beta2="below_one", seed="seed", world_size="nonnegative", gpu_gb="positive")

    def __post_init__(self):
        if self.mode not in ("lora", "full"):
            raise ValueError(f"--mode must be lora or full, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad = [t for t in self.target_list if t not in SITE_ORDER]
        if bad:
            raise ValueError(f"--targets: unknown {bad}; expected names among {list(SITE_ORDER)}")
        check_numbers(self)
        if self.cpu_offload and self.mode != "full":
            raise ValueError("--cpu-offload is for --mode full (a LoRA run's sharded base fits)")
        if self.save_every == 0 and self.save_minutes == 0:
            raise ValueError("--save-every 0 and --save-minutes 0 save no checkpoint before the "
                             "end, so a kill would lose the whole run: give one of them")

    @property
    def target_list(self):
        return [t for t in self.targets.split(",") if t]

    def layer_list(self, n_layers):
        s = self.layers.strip()
        if not s:
            return None
        if s == "last_third":
            return select_layers(n_layers, last_third=True)
        if "-" in s:
            rng, _, stride = s.partition(":")
            a, b = rng.split("-")
            return select_layers(n_layers, start=int(a), end=int(b) + 1,
                                 stride=int(stride) if stride else None)
        return select_layers(n_layers, indices=[int(i) for i in s.split(",")])


PRESETS = {  # the paper's two runs (docs/paper.md section B)
    "s1.1-rank1-32b": dict(mode="lora", rank=1, alpha=16.0, rslora=True,
                           targets=",".join(SITE_ORDER), lr=1e-3, warmup_ratio=0.05, epochs=5,
                           global_batch=16, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=1e-4,
                           grad_clip=1.0, block_size=20000, dtype="bfloat16",
                           activation_checkpointing=True),
    "s1.1-full-32b": dict(mode="full", lr=1e-5, warmup_ratio=0.05, epochs=5, global_batch=16,
                          beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=1e-4, grad_clip=1.0,
                          block_size=20000, dtype="bfloat16", activation_checkpointing=True),
}


# -----------------------------------------------------------------------------
# model


def build_model(cfg, mcfg, device, world):
    """Meta-device model -> adapters -> FSDP2 groups -> materialise -> load the checkpoint tensor by
    tensor (random weights without cfg.model: benchmarks)."""
    dtype = DTYPES[cfg.dtype]
    with torch.device("meta"):
        model = Qwen2(mcfg)
    if cfg.mode == "lora":
        model.to(dtype)  # the frozen base in `dtype` (bf16 attention takes the flash kernels)
        apply_lora(model, rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora,
                   targets=cfg.target_list, layers=cfg.layer_list(mcfg.num_hidden_layers),
                   verbose=False)
        ignored = {p for m in adapters(model) for p in (m.lora_A, m.lora_B)}
        mp = MixedPrecisionPolicy()  # base stored in `dtype`, adapters fp32 outside FSDP
    else:
        ignored = set()
        # fp32 master weights
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        layer.checkpoint = cfg.activation_checkpointing
    # with cpu_offload the sharded parameters, their gradients and AdamW's state live in host
    # memory; FSDP copies each layer's shards to the GPU for its all-gather
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else None
    apply_fsdp(model, init_device_mesh(device.type, (world,)), mp, ignored, offload)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    store = dtype if cfg.mode == "lora" else torch.float32
    if cfg.model:
        load_sharded(model, cfg.model, store)
    else:  # no checkpoint (bench/gpu.py): random weights, norms at 1
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.fill_(1.0)
                elif p not in ignored:
                    p.normal_(0.0, 0.02)
    if cfg.mode == "lora":
        gen = torch.Generator().manual_seed(cfg.seed)  # the same init on every rank, any world size
        for m in adapters(model):
            m.reset_lora_parameters(generator=gen)
    return model


def train_memory(cfg, mcfg, world):
    """The training run's memory per GPU in bytes, by what holds it (an estimate from the shapes,
    checked by hand in tests/test_train.py), and the host memory per GPU that --cpu-offload uses:
    - sharded: each rank's share of what FSDP shards: the frozen base in --dtype (LoRA), or the
      fp32 master weights, their gradients and AdamW's two moments, 16 bytes a parameter (full);
    - gathered: what FSDP holds whole while it computes: two decoder layers (one running, the next
      prefetched) and the root group (embeddings, head) in --dtype, and in full mode a layer's
      unsharded gradient in --dtype and in fp32 for the reduce-scatter;
    - adapters: the replicated fp32 adapters, their gradients and AdamW state (LoRA);
    - activations: the checkpointed inputs of every layer, one layer recomputed in backward and
      one chunk of fp32 logits with its gradient, at --block-size x --micro-batch tokens."""
    with torch.device("meta"):
        m = Qwen2(mcfg)
    n_base, L = m.num_params(), mcfg.num_hidden_layers
    n_layer = sum(p.numel() for p in m.model.layers[0].parameters())
    if cfg.mode == "lora":
        apply_lora(m, rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, targets=cfg.target_list,
                   layers=cfg.layer_list(L), verbose=False)
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    bpe = DTYPES[cfg.dtype].itemsize
    gathered = (2 * n_layer + n_base - L * n_layer) * bpe
    if cfg.mode == "lora":
        sharded, adapters_, host = n_base * bpe / world, n_train * 4 * 4, 0
    else:
        state = n_base * 16 / world
        sharded, host = (0, state) if cfg.cpu_offload else (state, 0)
        gathered, adapters_ = gathered + n_layer * (bpe + 4), 0
    T = cfg.block_size * cfg.micro_batch
    D, I, V = mcfg.hidden_size, mcfg.intermediate_size, mcfg.vocab_size
    acts = T * D * bpe * L + T * (12 * D + 4 * I) * bpe + min(T, cfg.loss_chunk) * V * 4 * 3
    parts = dict(sharded=sharded, gathered=gathered, adapters=adapters_, activations=acts)
    return dict(parts, total=sum(parts.values()), host=host, base_params=n_base,
                trainable_params=n_train)


def apply_fsdp(model, mesh, mp, ignored, offload=None):
    """FSDP2 groups: one per decoder layer (its parameters gathered for its forward and backward,
    then freed), and the root for the embeddings, final norm and head. `ignored`: parameters kept
    whole on every rank (the adapters); offload: FSDP's CPUOffloadPolicy or None."""
    n = len(model.model.layers)
    kw = dict(mesh=mesh, mp_policy=mp, ignored_params=ignored or None,
              offload_policy=offload or OffloadPolicy())
    for i, layer in enumerate(model.model.layers):
        # backward starts with the last layer, right after forward ends: resharding it would free
        # parameters only to gather them again at once, so it stays gathered (as torchtitan does)
        fully_shard(layer, reshard_after_forward=i < n - 1, **kw)
    fully_shard(model, **kw)


def load_sharded(model, path, dtype):
    """Copy an HF checkpoint into FSDP2-sharded parameters one tensor at a time: each rank keeps
    only its shard, and holds at most one full tensor (the largest: the embedding) at a moment."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in checkpoint_tensors(path, model.checkpoint_shapes(), dtype):
            p = params[k]
            if isinstance(p, DTensor):
                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements,
                                      src_data_rank=None)
            p.copy_(t)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(cfg, model):
    decay, no_decay = [], []
    for n, p in trainable(model):
        (no_decay if n.endswith(".bias") or "norm" in n else decay).append(p)  # HF's rule
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=False)


def lr_at(cfg, step, total, warmup):
    """HF's get_cosine_schedule_with_warmup at 0-based optimizer step `step` (step 0: lr 0)."""
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# schedule of batches


def plan(cfg, n_rows):
    steps_per_epoch = math.ceil(n_rows / cfg.global_batch)
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, total, math.ceil(cfg.warmup_ratio * total)


def step_batch(cfg, step, n_rows, steps_per_epoch):
    """Row indices of optimizer step `step` (0-based), the same for every world size."""
    epoch, k = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed + epoch)
    perm = torch.randperm(n_rows, generator=g).tolist()
    return perm[k * cfg.global_batch:(k + 1) * cfg.global_batch]


def empty_steps(cfg, trained):
    """The (1-based) optimizer steps whose global batch holds no trained-on token; trained: the
    trained-on token count of every sequence."""
    spe, total, _ = plan(cfg, len(trained))
    return [s + 1 for s in range(total)
            if not any(trained[i] for i in step_batch(cfg, s, len(trained), spe))]
