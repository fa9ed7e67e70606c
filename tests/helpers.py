"""Helpers shared by the test modules (fixtures live in conftest.py; tiny models in tiny_models/).

No test module imports another test module: what two of them need lives here.

- `FAST`, the demo recipe's overrides that make a conversion take seconds on a CPU; `TWO_EXPERT_CUT`,
  a shipped two-expert recipe's cut to a tiny two-expert pipeline;
- `invoke(*args)`, the `hla-convert` command line in process (typer's CliRunner), and
  `assert_one_line_error`, the house rule for bad input: one `hla-convert: error: ...` line on stderr;
- `console_script()`, the installed `hla-convert` entry point, for the tests that need a real process;
- `wan_recipe(**over)`, a small hadamard recipe for the tiny Wan, fields overridden as `section__key`;
- `rewrite_adapter(folder, ...)`, an adapter file with its tensors or header metadata edited in place;
- `write_logging_env(folder, log)`, the environment for a launch whose every process logs each atomic
  write (os.replace) with its rank, so a test can see that only the main process writes;
- `wan_original_layout(state_dict)` / `save_wan_single_file(model, path)`, a diffusers Wan
  transformer's weights in Wan-AI's ORIGINAL single-file layout (the inverse of diffusers'
  convert_wan_transformer_to_diffusers), and `save_wan_config(model, folder)`, its config alone;
- the seam tests' (tests/model/test_surgery.py and its neighbours) configs and tiny models:
  `HADAMARD`, `STUDENT_CONFIGS` / `STUDENT_IDS`, `tiny_base(arch)` (a fresh copy of a tiny model,
  its inputs and its unconverted output, built once per process) and `forward_no_grad`;
- `kernel_autograd_bytes(forward, do)`, what autograd keeps and allocates around a kernel's custom
  ops: the saved tensors' bytes and the bytes allocated in the backward outside the kernel's op.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from typer.testing import CliRunner

from hla_convert import HLAConfig
from hla_convert.cli import app

from tiny_models import forward, tiny_inputs, tiny_model

runner = CliRunner()

# The demo recipe, cut down to a few seconds: 6 + 2 training steps, checkpoints every 2 and 1.
FAST = {
    "calibration.samples": 8,
    "calibration.heldout": 4,
    "calibration.batch_size": 2,
    "stage1.steps": 6,
    "stage1.batch_size": 2,
    "stage1.checkpoint_every": 2,
    "stage2.steps": 2,
    "stage2.batch_size": 2,
    "stage2.checkpoint_every": 1,
    "validation.sampling_steps": 2,
    # Loose enough that 8 steps pass; the fail case tightens one threshold from the command line.
    "validation.max_attention_rel_l2": 10.0,
    "validation.max_output_rel_l2": 10.0,
    "validation.min_output_cosine": -1.0,
    "validation.max_latent_rel_l2": 10.0,
    "validation.min_latent_psnr": -100.0,
}


# A shipped two-expert recipe cut to a tiny two-expert pipeline (tests/test_experts*.py): 5 frames
# (2 latent frames: for image-to-video, the image's and one generated), 32 x 32 pixels (a 4 x 4
# latent, 2 x 2 tokens), 4 + 2 inputs per expert, 2 + 2 training steps, LoRA rank 4; 4 trajectory
# steps at the pipeline's shift 3 put 2 steps above t = 500 (transformer) and 2 below (transformer_2).
TWO_EXPERT_CUT = {
    "calibration.frames": 5,
    "calibration.height": 32,
    "calibration.width": 32,
    "calibration.samples": 4,
    "calibration.heldout": 2,
    "calibration.batch_size": 2,
    "calibration.text_len": 6,
    "calibration.trajectory_steps": 4,
    "stage1.steps": 2,
    "stage1.batch_size": 2,
    "stage1.checkpoint_every": 1,
    "stage2.steps": 2,
    "stage2.batch_size": 2,
    "stage2.checkpoint_every": 1,
    "stage2.lora_rank": 4,
    "validation.sampling_steps": 2,
}


def invoke(*args):
    """`hla-convert ARGS...` in this process; every argument is passed as its str()."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code: int = 2, contains: str | None = None) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    if code != 2:  # a run that failed on its way has logged its progress first
        lines = lines[-1:]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hla-convert: error: "), lines[0]
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(path: Path, name: str):
    """A benchmark script (not a package module) imported from its file as module `name`; its
    folder first on sys.path, so that its sibling modules import as it imports them."""
    import importlib.util

    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fidelity_module(name: str):
    """A module of benchmarks/fidelity/ (run, bench_recipes, report, ...) loaded as load_script does."""
    return load_script(BENCHMARKS / "fidelity" / f"{name}.py", f"fidelity_{name}")


def console_script() -> str:
    """The path of the installed `hla-convert` script (next to this Python first, then on PATH)."""
    exe = shutil.which("hla-convert", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the hla-convert console script is not installed"
    return exe


_WRITE_LOG_HOOK = """\
import os
_replace = os.replace
def _logged(src, dst, *a, **k):
    log = os.environ.get('HLA_TEST_WRITE_LOG')
    if log:
        with open(log, 'a') as f:
            f.write(f"{os.environ.get('RANK', '-')} {os.fspath(dst)}\\n")
    return _replace(src, dst, *a, **k)
os.replace = _logged
"""


def write_logging_env(folder: Path, log: Path) -> dict[str, str]:
    """This process's environment plus a sitecustomize (written into `folder`, put first on
    PYTHONPATH) that appends `RANK DESTINATION` to `log` for every os.replace (each atomic write)
    of every Python process started with it (RANK "-" where none is set); one torch thread."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_WRITE_LOG_HOOK)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HLA_TEST_WRITE_LOG=str(log),
        OMP_NUM_THREADS="1",
    )
    return env


def read_write_log(log: Path) -> list[tuple[str, str]]:
    """The `(rank, destination)` pairs a write_logging_env log holds, in order."""
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()]


def wan_recipe(**over):
    """A hadamard recipe for tiny_models' Wan: 5 x 64 x 64 video, 16 + 4 calibration samples,
    40 + 12 steps. `section__key=value` overrides one field (`stage1__steps=15`)."""
    from hla_convert.recipe import parse_recipe

    data = {
        "name": "t",
        "model": {"architecture": "WanTransformer3DModel"},
        "attention": {"kind": "hadamard", "feature_dim": 8},
        "calibration": {"frames": 5, "height": 64, "width": 64, "samples": 16, "heldout": 4, "batch_size": 4, "text_len": 6},
        "stage1": {"steps": 40, "lr": 5e-3, "batch_size": 8, "checkpoint_every": 10},
        "stage2": {"steps": 12, "lr": 1e-3, "batch_size": 4, "checkpoint_every": 5, "gradient_checkpointing": True},
    }
    for path, value in over.items():
        section, key = path.split("__")
        data[section][key] = value
    return parse_recipe(data)


def rewrite_adapter(folder: Path, change: Callable[[dict], None] | None = None, change_meta: Callable[[dict], None] | None = None) -> None:
    """Rewrite the adapter file with its tensors and/or its header metadata changed in place
    (`change(tensors)`, `change_meta(metadata)` edit the dicts they are given)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hla_convert.io.adapter import ADAPTER_FILE

    path = folder / ADAPTER_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if change is not None:
        change(tensors)
    if change_meta is not None:
        change_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def relist(folder, name: str) -> None:
    """Put `name`'s current sha256 in the folder's manifest, as a run that wrote it would."""
    from hla_convert.io.output_guard import read_manifest, sha256_file, write_manifest

    manifest = read_manifest(folder)
    manifest[name] = [sha256_file(folder / name)]
    write_manifest(folder, manifest)


# diffusers name -> Wan-AI original name (substrings), the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT
# in convert_wan_transformer_to_diffusers for a text-to-video Wan (no image embedder, no VACE blocks).
# diffusers swapped norm2 and norm3; the top-level scale_shift_table and proj_out are the head's.
_WAN_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".norm2.", ".norm3."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    (".scale_shift_table", ".modulation"),
)


def wan_original_layout(state_dict: dict, prefix: str = "") -> dict:
    """A WanTransformer3DModel state dict renamed to Wan-AI's original single-file layout
    (`blocks.0.self_attn.q.weight`, `head.modulation`, ...), each name under `prefix`
    (ComfyUI's files: "model.diffusion_model.")."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":
            name = "head.modulation"
        elif key.startswith("proj_out."):
            name = "head.head." + key.removeprefix("proj_out.")
        else:
            name = key
            for old, new in _WAN_TO_ORIGINAL:
                name = name.replace(old, new)
        out[prefix + name] = value.detach().clone().contiguous()
    return out


def save_wan_single_file(model, path: Path, prefix: str = "") -> Path:
    """`model`'s weights as one safetensors file in the original Wan layout."""
    from safetensors.torch import save_file

    save_file(wan_original_layout(model.state_dict(), prefix), str(path))
    return path


def save_wan_config(model, folder: Path) -> Path:
    """A diffusers model folder holding only `model`'s config.json (no weights): a single file's --config."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))
    return folder


# -- the seam tests' configs and tiny models (tests/model/test_surgery.py and its neighbours) ---------

HADAMARD = HLAConfig(kind="hadamard", factors=2, feature_dim=4)
STUDENT_CONFIGS = [
    HADAMARD,
    HLAConfig(kind="hadamard", factors=3, feature_dim=3, feature_map="softplus"),
    HLAConfig(kind="linear", factors=2, feature_dim=3),
    HLAConfig(kind="higher_order", feature_dim=4),
    HLAConfig(kind="hybrid", factors=2, feature_dim=4, window=(1, 0, 0), halo=(0, 1, 1)),
]
STUDENT_IDS = ["hadamard-taylor", "hadamard-softplus-F3", "linear", "higher_order", "hybrid"]

_CACHE: dict[str, tuple[torch.nn.Module, dict, torch.Tensor]] = {}


def tiny_base(arch: str):
    """(a fresh copy of the tiny model, its inputs, its unconverted output)."""
    if arch not in _CACHE:
        model = tiny_model(arch)
        inputs = tiny_inputs(arch, model=model)
        with torch.no_grad():
            ref = forward(model, inputs)
        _CACHE[arch] = (model, inputs, ref)
    model, inputs, ref = _CACHE[arch]
    return copy.deepcopy(model), inputs, ref


def forward_no_grad(model, inputs):
    with torch.no_grad():
        return forward(model, inputs)


def kernel_autograd_bytes(forward: Callable[[], torch.Tensor], do: torch.Tensor) -> tuple[list[int], int]:
    """(bytes of each tensor saved for backward by `forward()`, bytes autograd allocates in the
    backward outside the hla_kernels custom ops).

    The second counts every factory call (zeros, empty, ...) the backward makes other than inside
    an hla_kernels op (a dispatch mode sees a custom op as one call): the zero gradients autograd
    materialises for outputs the formula ignores land here. A kernel's own temporaries do not.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    factories = {"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "full", "full_like", "new_empty", "new_zeros", "new_full"}

    class Allocations(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.namespace != "hla_kernels" and func.overloadpacket.__name__ in factories:
                Allocations.total += out.numel() * out.element_size()
            return out

    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    with Allocations():
        out.backward(do)
    return saved, Allocations.total
