"""Shared basics: base directory, rank-0 printing, device/dtype autodetect, DDP init, seeding,
peak FLOPs for MFU, atomic file writes and a no-op wandb stand-in."""
import contextlib
import hashlib
import json
import os
import random
import tempfile

# torch is imported inside the functions that use it: the data tools (nanochat.dataset, clean_data)
# use this module without it, and importing torch alone costs ~650 MB of RSS and a second or two.


class DataError(ValueError):
    """Bad input data; the message names the file, line and field. `reason` is the short name the
    cleaning pass (nanochat.clean_data) counts such a row under, e.g. "malformed_json"."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason


def parse_jsonl_line(raw: bytes, where: str):
    """One JSONL line -> its object, or None for a blank line. `where` ('file: line N') starts the
    DataError of a line that is not UTF-8, not JSON or not a JSON object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})", "not_utf8") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})", "malformed_json") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", "not_an_object")
    return obj


def open_input(path):
    """A user's file opened for reading bytes; DataError naming it when it cannot be opened."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


def iter_jsonl(path):
    """Stream (line number, object) of a JSONL file's non-blank lines, in constant memory. A DataError
    names the file (and the line) when it cannot be opened, a line is not UTF-8, not JSON or not an
    object, or there is no line at all (raised at the end)."""
    empty = True
    with open_input(path) as f:
        for lineno, raw in enumerate(f, start=1):
            obj = parse_jsonl_line(raw, f"{path}: line {lineno}")
            if obj is not None:
                empty = False
                yield lineno, obj
    if empty:
        raise DataError(f"{path}: empty file (no JSON lines)")


def read_jsonl(path):
    """[(line number, object)] of a JSONL file's non-blank lines (iter_jsonl, all in memory)."""
    return list(iter_jsonl(path))


def get_base_dir() -> str:
    """Where data, tokenizer and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


# -----------------------------------------------------------------------------
# Device and dtype

def autodetect_device_type() -> str:
    """"cuda" if a CUDA GPU is visible, else "mps" (Apple silicon), else "cpu"."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device_type: str):
    """bf16 on CUDA GPUs that support it (Ampere+); fp32 everywhere else (CPU bf16 matmuls are slow)."""
    import torch
    if device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_for(device, dtype=None):
    """The forward's autocast context: bf16 where compute_dtype picks it (or `dtype`), else none."""
    import torch
    device_type = torch.device(device).type
    dtype = dtype or compute_dtype(device_type)
    return torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Distributed

def is_ddp() -> bool:
    """True when launched by torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from torchrun's environment; (False, 0, 0, 1) without it."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type: str = ""):
    """Set up the device (and the process group under torchrun).

    Returns (ddp, rank, local_rank, world_size, device). `device_type` "" means autodetect.
    nccl on CUDA (one GPU per local rank), gloo on CPU; MPS has no multi-process backend.
    """
    import torch
    import torch.distributed as dist
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be 'cuda', 'mps' or 'cpu', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' but no CUDA GPU is visible to PyTorch")
    if device_type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device_type='mps' but MPS is not available")
    if device_type == "cuda":
        # TF32 for any fp32 matmuls that remain (bf16 autocast does the bulk of the work)
        torch.set_float32_matmul_precision("high")

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "mps":
        raise RuntimeError("torchrun with MPS is not supported; run a single process on Apple silicon")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def is_distributed() -> bool:
    """A process group of more than one rank is running."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def compute_cleanup():
    """Tear down the process group if one was created (call at the end of every script)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum a tensor over the ranks in place and return it (a no-op with one process)."""
    import torch.distributed as dist
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_from_master(obj):
    """Rank 0's value of a picklable object on every rank (the object itself without torch.distributed)."""
    import torch.distributed as dist
    if is_distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def seed_everything(seed: int):
    """Seed python, numpy (if present) and torch (CPU and all GPUs)."""
    import torch
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(seed)  # also seeds every CUDA device


# -----------------------------------------------------------------------------
# Peak FLOPs for MFU: dense bf16 tensor-core throughput per device (vendor data sheets, no sparsity).
# Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS_BF16 = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 ADA", 364e12),
    ("RTX A6000", 155e12),
    ("A6000", 155e12),
    ("5090", 210e12),
    ("4090", 165e12),  # fp32 accumulate, which is what PyTorch uses
    ("3090", 71e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops_from_name(name: str):
    """Peak dense bf16 FLOP/s for a GPU name, or None when the GPU is not in the table."""
    upper = name.upper()
    for key, flops in PEAK_FLOPS_BF16:
        if key in upper:
            return flops
    return None


def get_peak_flops(device):
    """Peak FLOP/s used as the MFU denominator, or None (MFU then prints as n/a).

    CPU and MPS return None on purpose: their peak depends on core count, clocks and
    vector units, and a made-up number would make MFU look meaningful when it is not.
    """
    import torch
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_from_name(torch.cuda.get_device_name(device))


# -----------------------------------------------------------------------------
# Atomic writes: readers see the old file or the complete new one, never a torn one.

def fsync_dir(path: str):
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path, chunk=1 << 22):
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None):
    """Open a temp file beside `path`; on success flush, fsync, rename over `path`, fsync the dir.

    On an exception the temp file is removed and `path` is untouched. Temp names start with
    "." and contain ".tmp" so directory scans can skip them.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{os.getpid()}", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


# -----------------------------------------------------------------------------
# wandb

class DummyWandb:
    """Stand-in with wandb's run interface that does nothing (for --run=dummy and non-zero ranks)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass


def init_wandb(run: str, config: dict, master_process: bool, use_dummy_wandb: bool = False, project: str = "nanochat"):
    """A wandb run on the master process, or DummyWandb for run == "dummy", use_dummy_wandb or other ranks."""
    if run == "dummy" or use_dummy_wandb or not master_process:
        return DummyWandb()
    try:
        import wandb  # lazy: wandb is slow to import and needs network/login only when really used
    except ImportError:
        print0("wandb is not installed; logging disabled (pip install wandb, or pass --run=dummy)")
        return DummyWandb()
    return wandb.init(project=project, name=run, config=config)
