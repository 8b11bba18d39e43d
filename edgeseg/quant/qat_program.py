"""A QAT checkpoint's int8 program on disk: its scheme per target (each profile's `[qat]` table), the check that a
checkpoint exports to a target, and the data-only reader and the atomic writer of the program.

`load_program_data_only` reads the program back without `torch.export.load`, which unpickles payloads an archive
marks as pickles: JSON graph and raw tensors only, anything else refused; `quant.program` must name a file inside
the checkpoint folder. Export reads QAT checkpoints through this module; the training side is edgeseg.train.qat.
"""
from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.targets import qat_targets, targets_exporting

# target -> (quantizer family, scheme line for the manifest), a view of the profiles' [qat] tables
QAT_TARGETS: dict[str, tuple[str, str]] = {t: (q.scheme, q.about) for t, q in qat_targets().items()}

PROGRAM_FILE = "qat_int8.pt2"
# target -> (quantizer family, scheme line for the manifest)


def check_export_target(quant: dict[str, Any], target: str, where: str) -> None:
    """UsageError unless a QAT checkpoint's graph (its `quant` record) can be exported to `target`."""
    family = quant.get("quantizer") or QAT_TARGETS.get(quant.get("target", ""), ("",))[0]
    ok = targets_exporting(family)
    if target not in ok:
        raise UsageError(f"--target {target}: {where} was fine-tuned for {quant.get('target')}'s int8 scheme "
                         f"({family}), which exports to {', '.join(ok) or 'no target'}; re-run `edgeseg qat "
                         f"--target {target}`, or export the float checkpoint it came from")


_RANDOM_OPS = ("bernoulli", "rand", "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
               "normal", "multinomial")


def check_deterministic(gm: nn.Module, where: str) -> None:
    """Refuse a QAT graph that still draws random numbers (ArtifactError naming the first such op)."""
    for n in gm.graph.nodes:
        parts = str(n.target).split(".")  # "aten.bernoulli.p" -> "bernoulli"
        op = (parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[-1]).lstrip("_")
        if "dropout" in op and len(n.args) > 2 and n.args[2] is False:
            continue  # dropout(x, p, train=False) is the identity
        if n.op == "call_function" and op.startswith(_RANDOM_OPS):
            raise ArtifactError(f"{where}: the QAT graph draws random numbers ({n.target} at {n.name}); an int8 "
                                "artifact must be deterministic")


# the ops a converted QAT graph computes with; anything else (another library's custom op, a higher-order op
# that runs a subgraph or a callable) has no place in one
PROGRAM_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed", "torchao")


def load_program_data_only(path: str | Path) -> "torch.export.ExportedProgram":
    """The ExportedProgram in a `torch.export.save` archive, read without anything that could run code.

    Why not `torch.export.load`: torch 2.13's loader unpickles (`torch.load(weights_only=False)` or
    `pickle.loads`) every weight or constant the archive's payload config marks `use_pickle`, custom-object and
    opaque constants, legacy `data/weights|constants/<model>.pt` files, and example inputs that
    `weights_only=True` refuses; it loads AOTInductor shared libraries and falls back to an older zip reader
    on errors. A downloaded QAT checkpoint could carry any of these. Here only JSON (the graph, the payload
    configs), raw tensor bytes and the example inputs through `torch.load(weights_only=True)` are read, with
    torch's own archive reader and deserializer; an archive that needs more is refused (torch.export.save of a
    converted QAT graph needs none of it), and so is a graph calling ops outside PROGRAM_OP_NAMESPACES.

    Raises:
        ArtifactError: one line naming `path` and the refused entry, or why the archive is unreadable.
    """
    path = Path(path)
    try:
        reader, names = _read_archive(path)
        ep = _deserialize(path, reader, names)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged archive fails anywhere in torch's reader
        msg = one_line(e)
        raise ArtifactError(f"{path}: unreadable ExportedProgram ({type(e).__name__}: {msg})") from None
    _check_graph_ops(path, ep)
    return ep


_PROGRAM_NAME = "model"  # the one program torch.export.save writes (torch.export.load returns this one)


def _refusal(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: refused to load the QAT program: {why}; a QAT program holds a JSON graph "
                         "and raw tensors only")


def _read_archive(path: Path) -> tuple[Any, set[str]]:
    """Open the archive with torch's reader; refuse a foreign version and the entries torch's loader would
    unpickle or load as compiled code in place of the data read here. Returns (reader, entry names)."""
    from torch.export.pt2_archive import constants as C
    from torch.export.pt2_archive._package import PT2ArchiveReader

    reader = PT2ArchiveReader(str(path))
    names = set(reader.get_file_names())
    if reader.read_string(C.ARCHIVE_VERSION_PATH) != C.ARCHIVE_VERSION_VALUE:
        raise ArtifactError(f"{path}: archive version {reader.read_string(C.ARCHIVE_VERSION_PATH)!r}, this torch "
                            f"reads {C.ARCHIVE_VERSION_VALUE!r}")
    for entry in sorted(names):
        if entry in (f"{C.WEIGHTS_DIR}{_PROGRAM_NAME}.pt", f"{C.CONSTANTS_DIR}{_PROGRAM_NAME}.pt"):
            raise _refusal(path, f"{entry} is a pickle (the legacy weights format)")
        if entry.startswith(C.AOTINDUCTOR_DIR):
            raise _refusal(path, f"{entry!r} is AOTInductor compiled code")
    return reader, names


def _deserialize(path: Path, reader: Any, names: set[str]) -> "torch.export.ExportedProgram":
    """The graph JSON, weights, constants and example inputs, handed to torch's deserializer as objects so it
    never unpickles them."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive import constants as C

    graph_file = C.MODELS_FILENAME_FORMAT.format(_PROGRAM_NAME)
    if graph_file not in names:
        raise ArtifactError(f"{path}: no {graph_file}; not a torch.export.save archive")
    serialized = _bytes_to_dataclass(schema.ExportedProgram, reader.read_bytes(graph_file))
    state_dict = _load_payloads(path, reader, names, C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(_PROGRAM_NAME),
                                "weight")
    constants = _load_payloads(path, reader, names, C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(_PROGRAM_NAME),
                               "constant")
    example_inputs = _example_inputs(path, reader, names)
    return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, example_inputs)


def _check_payloads(path: Path, reader: Any, names: set[str], config_file: str, kind: str) -> Any:
    """The payload config of the weights or constants, once every entry it lists is a raw tensor backed by
    bytes in the file (a refusal naming the first that is not)."""
    import math

    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass, deserialize_size
    from torch.export.pt2_archive import constants as C

    if config_file not in names:
        raise ArtifactError(f"{path}: no {config_file}; not a torch.export.save archive of this torch")
    config = _dict_to_dataclass(schema.PayloadConfig, json.loads(reader.read_string(config_file)))
    base = C.WEIGHTS_DIR if kind == "weight" else C.CONSTANTS_DIR
    for fqn, meta in config.config.items():
        entry = base + meta.path_name
        if meta.use_pickle or meta.tensor_meta is None:
            raise _refusal(path, f"{kind} {fqn!r} ({entry!r}) is a pickle")
        if kind == "constant" and not meta.path_name.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise _refusal(path, f"constant {fqn!r} ({entry!r}) is a pickled object, not a tensor")
        # torch fills an empty record with zeros of the declared size: no allocation the file does not back
        if (reader.archive_file.get_record_size(entry) == 0
                and math.prod(deserialize_size(meta.tensor_meta.sizes)) != 0):
            raise _refusal(path, f"{kind} {fqn!r} ({entry!r}) declares a tensor but stores no bytes")
    return config


def _load_payloads(path: Path, reader: Any, names: set[str], config_file: str, kind: str
                   ) -> dict[str, torch.Tensor]:
    """{fqn: tensor or Parameter} of the weights or constants, from raw bytes only."""
    from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
    from torch.export.pt2_archive import constants as C
    from torch.export.pt2_archive._package import _build_file_map

    config = _check_payloads(path, reader, names, config_file, kind)
    base = C.WEIGHTS_DIR if kind == "weight" else C.CONSTANTS_DIR
    flat = _build_file_map(reader, config, base)  # raw bytes -> flat tensors (it skips pickles; none left)
    out = {}
    for fqn, meta in config.config.items():
        t = torch.as_strided(flat[meta.path_name], deserialize_size(meta.tensor_meta.sizes),
                             deserialize_stride(meta.tensor_meta.strides),
                             deserialize_storage_offset(meta.tensor_meta.storage_offset))
        out[fqn] = (nn.Parameter(t, requires_grad=meta.tensor_meta.requires_grad) if meta.is_param else t)
    return out


def _example_inputs(path: Path, reader: Any, names: set[str]) -> tuple | None:
    """The archive's example inputs through `torch.load(weights_only=True)`, None when it has none."""
    import io
    import pickle

    from torch.export.pt2_archive import constants as C

    inputs_file = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(_PROGRAM_NAME)
    if inputs_file not in names:
        return None
    try:
        example_inputs = torch.load(io.BytesIO(reader.read_bytes(inputs_file)), weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path, f"{inputs_file} is a pickle of more than tensors") from None
    if not isinstance(example_inputs, tuple):
        raise _refusal(path, f"{inputs_file} holds {type(example_inputs).__name__}, not the example inputs")
    return example_inputs


def _check_graph_ops(path: Path, ep: "torch.export.ExportedProgram") -> None:
    """Refuse a graph that calls anything but an op of PROGRAM_OP_NAMESPACES (getitem and symbolic-size ops
    aside)."""
    from torch._export.serde.serialize import _SYM_OPS

    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem or n.target in _SYM_OPS:
            continue
        ns = getattr(n.target, "namespace", None)
        if not isinstance(n.target, torch._ops.OpOverload) or ns not in PROGRAM_OP_NAMESPACES:
            raise _refusal(path, f"its graph calls {str(n.target)[:120]!r}, not an op of "
                                 f"{'/'.join(PROGRAM_OP_NAMESPACES)}")


def load_qat_program(checkpoint: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The converted int8 graph of a QAT checkpoint as a module, with its `quant` record.

    The program is read by `load_program_data_only` (JSON graph + raw tensors, nothing unpickled), from a path
    that must stay inside the checkpoint folder.

    Raises:
        ArtifactError: the checkpoint has no QAT program, names one outside its folder, or it is unreadable or
        refused.
    """
    from edgeseg.checkpoint import SPEC, contained_file, load_spec

    checkpoint = Path(checkpoint)
    spec = load_spec(checkpoint)
    quant = spec.quant or {}
    prog = quant.get("program")
    if not prog:
        raise ArtifactError(f"{checkpoint}: not a QAT checkpoint (model.json has no quant.program)")
    path = contained_file(checkpoint, prog, "quant.program", checkpoint / SPEC)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (named by model.json quant.program)")
    # registers the quantized_decomposed q/dq ops the program refers to (the deserializer resolves ops by name;
    # without it a fresh process fails on `dequantize_per_channel`)
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    ep = load_program_data_only(path)
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    gm = ep.module()
    check_deterministic(gm, str(path))  # QAT checkpoints written before stochastic layers were switched off
    allow_exported_model_train_eval(gm)  # ExportWrapper(...).eval() must work on the loaded graph
    gm.output_stride = int(quant.get("output_stride", 1))
    return gm, quant


def save_qat_checkpoint(path: str | Path, model: nn.Module, spec, program: "torch.export.ExportedProgram",
                        force: bool = False) -> Path:
    """Write a QAT checkpoint folder atomically: the float weights, `model.json` (with `spec.quant`, whose
    `program` names the file) and the converted program. Raises UsageError if `path` exists and not `force`."""
    from edgeseg.checkpoint import save_checkpoint

    name = (spec.quant or {}).get("program") or PROGRAM_FILE
    return save_checkpoint(path, model, spec, force=force,
                           extra={name: lambda tmp: torch.export.save(program, str(tmp))})


__all__ = ["QAT_TARGETS", "PROGRAM_FILE", "check_export_target", "check_deterministic", "PROGRAM_OP_NAMESPACES",
           "load_program_data_only", "load_qat_program", "save_qat_checkpoint"]
