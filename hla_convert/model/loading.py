"""Hub ID or local folder -> the diffusers video transformer (and where its pipeline lives).

Accepted MODEL forms:
- a local pipeline folder (has model_index.json): its transformer component is loaded;
- a local bare transformer folder (has config.json with a diffusers `_class_name`);
- a Hugging Face Hub ID ("owner/name"): a pipeline repository (model_index.json) or a bare one;
- a single-file checkpoint (one .safetensors in the family's original layout, model.single_file)
  with `config`: the diffusers config that describes it, a local pipeline or transformer folder or
  a Hub ID (through the local Hugging Face cache); loaded by diffusers' `from_single_file`. A
  pipeline config also gives the pipeline (scheduler, text encoder, VAE) around it;
- None: the embedded demo model shipped in the package.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import first_line

DEMO_MODEL_PATH = Path(__file__).resolve().parents[1] / "demo_model"  # package data: hla_convert/demo_model
DEMO_MODEL_NAME = "hla-convert/demo-wan-tiny"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(ValueError):
    """MODEL could not be loaded; the message is one line saying what and why."""


@dataclass
class LoadedModel:
    transformer: nn.Module
    source: str  # Hub ID or absolute local path, as given to from_pretrained
    revision: str | None
    subfolder: str | None
    pipeline_dir: str | None  # the full pipeline (local folder or Hub ID) when MODEL is one
    is_demo: bool = False
    config: str | None = None  # a single-file MODEL's diffusers config (folder or Hub ID)


def looks_like_hub_id(model: str) -> bool:
    """Whether MODEL has the form load_transformer sends to the Hub (ORG/NAME), not a path."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "/", "~"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16', 'float32', torch.float16, None -> a torch dtype (None keeps the checkpoint's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[key]


def _transformer_class(name: str, where: str):
    import diffusers
    from diffusers import ModelMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ModelLoadError(f"{where} names {name!r}, which is not a diffusers model class in diffusers {diffusers.__version__}")
    return cls


def _read_json(path: Path) -> dict:
    """A config.json / model_index.json: a JSON object from a regular file of a bounded size."""
    from ..user_files import MAX_JSON_BYTES, read_json_file

    doc = read_json_file(path, str(path), MAX_JSON_BYTES, ModelLoadError)
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{path} is not a JSON object: not a diffusers config")
    return doc


# Bounds of a transformer's config, checked before diffusers builds anything from it (even on the
# meta device, 100,000,000 layers are 100,000,000 modules): the largest video DiTs have 60 blocks
# and a width of 5,120, so past these a config is damaged or hostile.
MAX_CONFIG_LAYERS = 1_000
MAX_CONFIG_WIDTH = 65_536
_DEPTH_WORDS = ("layers", "blocks", "depth")
_WIDTH_WORDS = ("dim", "channels", "heads", "features", "size")


def check_config_bounds(config: dict, where: str) -> None:
    """Refuse (ModelLoadError, one line) a transformer config whose layer count or widths are past
    MAX_CONFIG_LAYERS / MAX_CONFIG_WIDTH: more than any machine could hold, or build in hours."""
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int) or key.startswith("_"):
            continue
        words = key.lower()
        limit = MAX_CONFIG_LAYERS if any(w in words for w in _DEPTH_WORDS) else MAX_CONFIG_WIDTH if any(w in words for w in _WIDTH_WORDS) else None
        if limit is not None and value > limit:
            raise ModelLoadError(f"{where}: {key} = {value:,} is past {limit:,}, more than any video transformer has (a damaged config?)")
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim > MAX_CONFIG_WIDTH:
        raise ModelLoadError(f"{where}: num_attention_heads x attention_head_dim = {heads * head_dim:,} is past {MAX_CONFIG_WIDTH:,} (a damaged config?)")


def _local_component(folder: Path, subfolder: str | None) -> tuple[str, str | None, str | None]:
    """-> (class name, subfolder to load, pipeline folder or None) for a local folder."""
    index = folder / "model_index.json"
    if index.is_file() and not subfolder:
        entry = _read_json(index).get("transformer")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise ModelLoadError(f"{folder} is a pipeline folder without a transformer component in model_index.json")
        config = folder / "transformer" / "config.json"
        if config.exists():
            check_config_bounds(_read_json(config), str(config))
        return entry[1], "transformer", str(folder)
    target = folder / subfolder if subfolder else folder
    config = target / "config.json"
    if not config.is_file() and not config.exists():
        raise ModelLoadError(f"{target} is neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)")
    doc = _read_json(config)
    check_config_bounds(doc, str(config))
    name = doc.get("_class_name")
    if not name:
        raise ModelLoadError(f"{config} has no _class_name: not a diffusers model folder")
    pipeline = str(folder) if index.is_file() else None
    return name, subfolder, pipeline


def _hub_component(repo: str, revision: str | None, subfolder: str | None) -> tuple[str, str | None, str | None]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    def fetch(filename: str, sub: str | None) -> dict | None:
        try:
            path = hf_hub_download(repo, filename, subfolder=sub, revision=revision)
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError in newer huggingface_hub: first
            raise ModelLoadError(
                f"could not reach the Hugging Face Hub for {repo!r} and it is not in the local cache; "
                "pass a local folder instead"
            ) from None
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError:
            raise ModelLoadError(f"{repo!r} is not a model on the Hugging Face Hub (or it is private)") from None
        except (HfHubHTTPError, OSError) as exc:
            raise ModelLoadError(f"could not fetch {repo!r} from the Hugging Face Hub: {first_line(exc)}") from None
        return _read_json(Path(path))

    if not subfolder:
        index = fetch("model_index.json", None)
        if index is not None:
            entry = index.get("transformer")
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
                raise ModelLoadError(f"{repo!r} is a pipeline without a transformer component")
            config = fetch("config.json", "transformer")
            if config is not None:
                check_config_bounds(config, f"{repo}/transformer/config.json")
            return entry[1], "transformer", repo
    config = fetch("config.json", subfolder)
    if config is None or "_class_name" not in config:
        raise ModelLoadError(f"{repo!r} has no diffusers config.json{' in ' + subfolder if subfolder else ''}")
    check_config_bounds(config, f"{repo}/{subfolder + '/' if subfolder else ''}config.json")
    return config["_class_name"], subfolder, None


@dataclass(frozen=True)
class ModelRef:
    """Where MODEL's transformer is, before anything heavy is read."""

    cls: type  # the diffusers model class named by its config
    path: str  # what from_pretrained takes: an absolute folder or a Hub ID
    subfolder: str | None
    revision: str | None
    pipeline_dir: str | None
    is_demo: bool
    config: str | None = None  # a single-file MODEL (path: the .safetensors): its diffusers config
    config_subfolder: str | None = None  # "transformer" when `config` is a pipeline

    @property
    def source(self) -> str:
        """The base model's name as recorded in adapters and reports."""
        return DEMO_MODEL_NAME if self.is_demo else self.path

    def pretrained_kwargs(self) -> dict:
        return {k: v for k, v in {"subfolder": self.subfolder, "revision": self.revision}.items() if v}


def resolve_model(model: str | None, revision: str | None = None, subfolder: str | None = None, config: str | None = None) -> ModelRef:
    """Find MODEL's transformer (see module docstring) from its config files only; no weights read.
    `config` is for a single-file MODEL only (its diffusers config)."""
    from .single_file import is_single_file

    if is_single_file(model):
        return _single_file_ref(Path(os.path.expanduser(model)).resolve(), revision, subfolder, config)
    if config is not None:
        raise ModelLoadError(f"--config applies to a single-file MODEL (a .safetensors checkpoint), not to {model or 'the demo model'}")
    is_demo = model is None
    if is_demo:
        model = str(DEMO_MODEL_PATH)
        if not (DEMO_MODEL_PATH / "config.json").is_file():
            raise ModelLoadError(f"the embedded demo model is missing from {DEMO_MODEL_PATH}; reinstall hla-convert")
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        path = path.resolve()
        if revision:
            raise ModelLoadError(f"--revision applies to Hub IDs, not to the local folder {path}")
        name, sub, pipeline = _local_component(path, subfolder)
        where = str(path)
    elif path.exists():
        raise ModelLoadError(f"{model} is a file; MODEL must be a folder, a Hub ID or a .safetensors checkpoint")
    elif _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        name, sub, pipeline = _hub_component(model, revision, subfolder)
        where = model
    else:
        raise ModelLoadError(f"{model!r} is neither an existing folder nor a Hub ID of the form owner/name")
    return ModelRef(_transformer_class(name, where), where, sub, revision, pipeline, is_demo)


def _single_file_ref(path: Path, revision: str | None, subfolder: str | None, config: str | None) -> ModelRef:
    """The ModelRef of a single-file checkpoint: its class from its tensor names (the architecture
    table), its config from `config`, which must describe that class."""
    from .single_file import SingleFileError, checkpoint_architecture

    if revision or subfolder:
        raise ModelLoadError(f"--revision and --subfolder apply to folders and Hub IDs, not to the single file {path}")
    try:
        arch = checkpoint_architecture(path)
    except SingleFileError as exc:
        raise ModelLoadError(str(exc)) from None
    if not config:
        raise ModelLoadError(
            f"{path} is a single-file {arch} checkpoint: give its diffusers config with --config (a local pipeline or "
            "transformer folder, or a Hub ID in the local cache) or the recipe's model.config"
        )
    folder = Path(os.path.expanduser(config))
    if folder.is_dir():
        where = str(folder.resolve())
        name, sub, pipeline = _local_component(Path(where), None)
    elif looks_like_hub_id(config):
        where = config
        name, sub, pipeline = _hub_component(config, None, None)
    else:
        raise ModelLoadError(f"--config {config!r} is neither an existing folder nor a Hub ID of the form owner/name")
    if name != arch:
        raise ModelLoadError(f"--config {where} describes a {name}, but {path} is a {arch} checkpoint")
    cls = _transformer_class(name, where)
    if not hasattr(cls, "from_single_file"):
        raise ModelLoadError(f"{name} cannot load a single file in diffusers (no from_single_file); convert it to a diffusers folder")
    return ModelRef(cls, str(path), None, None, pipeline, False, config=where, config_subfolder=sub)


def _from_single_file(ref: ModelRef, torch_dtype: torch.dtype | None) -> nn.Module:
    """diffusers' from_single_file with the config `ref` names; a file that does not fill the
    config's model (weights left on the meta device) or holds more tensors than it has is refused."""
    from accelerate import init_empty_weights

    from .single_file import checkpoint_keys

    # The tensor count first, against the config's model built on the meta device (no storage):
    # diffusers leaves a missing weight on the meta device and drops an unused one with a warning.
    sub = {"subfolder": ref.config_subfolder} if ref.config_subfolder else {}
    with init_empty_weights():
        skeleton = ref.cls.from_config(ref.cls.load_config(ref.config, **sub))
    differ = len(checkpoint_keys(ref.path)) - len(skeleton.state_dict())
    if differ:
        what = f"lacks {-differ} weight(s) of" if differ < 0 else f"holds {differ} tensor(s) more than"
        raise ModelLoadError(f"{ref.path} {what} the {ref.cls.__name__} that {ref.config} describes: not a checkpoint of that config")
    kwargs = {"config": ref.config, **sub}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    transformer = ref.cls.from_single_file(ref.path, **kwargs)
    missing = sorted(k for k, v in transformer.state_dict().items() if v.is_meta)
    if missing:  # the count matched, the names did not
        raise ModelLoadError(f"{ref.path} lacks the weight {missing[0]} of the {ref.cls.__name__} that {ref.config} describes: not a checkpoint of that config")
    return transformer


def load_transformer(
    model: str | None,
    revision: str | None = None,
    subfolder: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: str | None = None,
) -> LoadedModel:
    """Load the video transformer of MODEL (see module docstring) in eval mode; None = the demo model.
    config: a single-file MODEL's diffusers config (folder or Hub ID)."""
    torch_dtype = parse_dtype(dtype)
    ref = resolve_model(model, revision, subfolder, config)
    kwargs = ref.pretrained_kwargs()
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        with quiet_loading():
            if ref.config is not None:
                transformer = _from_single_file(ref, torch_dtype)
            else:
                transformer = ref.cls.from_pretrained(ref.path, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # TypeError: a config value of the wrong type
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not load {ref.cls.__name__} from {ref.path}: {first_line(exc)}") from None
    except Exception as exc:  # diffusers' SingleFileComponentError (an Exception): weights missing from the file
        if type(exc).__name__ != "SingleFileComponentError":
            raise
        raise ModelLoadError(f"could not load {ref.cls.__name__} from {ref.path}: {first_line(exc)}") from None
    if device is not None:
        transformer.to(device)
    transformer.eval()
    return loaded_from(ref, transformer)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off ("Loading pipeline components",
    "Loading weights") and, unless HLA_CONVERT_DEBUG is set, their log warnings and Python warnings
    ("config attributes ... will be ignored", the torch_dtype deprecation notice) too: noise among
    the command's output, and before a load error the one error line must be the only line."""
    import importlib
    import warnings

    debug = bool(os.environ.get("HLA_CONVERT_DEBUG"))
    restore = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging = importlib.import_module(name)
        except ImportError:
            continue
        if logging.is_progress_bar_enabled():
            logging.disable_progress_bar()
            restore.append(logging.enable_progress_bar)
        if not debug:
            level = logging.get_verbosity()
            logging.set_verbosity_error()
            restore.append(lambda logging=logging, level=level: logging.set_verbosity(level))
    try:
        with warnings.catch_warnings():
            # newer diffusers name it `dtype`; `torch_dtype` is what every supported version takes
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if not debug:
                warnings.simplefilter("ignore")
            yield
    finally:
        for undo in reversed(restore):
            undo()


def loaded_from(ref: ModelRef, transformer: nn.Module) -> LoadedModel:
    return LoadedModel(
        transformer=transformer,
        source=ref.source,
        revision=ref.revision,
        subfolder=ref.subfolder,
        pipeline_dir=ref.pipeline_dir,
        is_demo=ref.is_demo,
        config=ref.config,
    )


def load_demo_model(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> LoadedModel:
    """The embedded tiny WanTransformer3DModel (see docs/demo_model.md)."""
    return load_transformer(None, dtype=dtype, device=device)


def resolve_source(source: str) -> str | None:
    """The MODEL argument that reloads a base recorded in an adapter: the demo's name maps to None."""
    return None if source == DEMO_MODEL_NAME else source
