"""Compiles the real train step for a TPU slice on any machine; one JSON line per compile.

The library of `python -m ddae_jax.aot`; its usage and options: ddae_jax/aot.py. It sets
no environment: a caller that compiles for a slice here (slice_devices) sets
JAX_PLATFORMS=cpu and ALLOW_MULTIPLE_LIBTPU_LOAD=1 before JAX starts, as the binary does.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddae_jax import config_attention, config_checks, config_lib, runtime, sharding
from ddae_jax import train_step as ts
from ddae_jax.evaluation import config as eval_config
from ddae_jax.evaluation import finetune
from ddae_jax.models.vit import Block
from ddae_jax.perf import flops


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: its libtpu topology prefix and data-sheet figures per chip
  (the peak FLOP/s are flops.PEAK_TFLOPS's, by the devices' kind)."""
  topology_prefix: str  # "v4" -> "v4:2x2x1"
  cores_in_name: bool   # gcloud's v4-N / v5p-N count TensorCores, two per chip
  hbm_gib: float
  hbm_gbps: float       # HBM bandwidth, GB/s
  three_d: bool         # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


# Google's system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e).
CHIPS = {
    "v4": Chip("v4", True, 32, 1228, True),
    "v5p": Chip("v5", True, 95, 2765, True),
    "v5e": Chip("v5e", False, 16, 819, False),
    "v6e": Chip("v6e", False, 32, 1640, False),
}
# Chips -> torus shape, as gcloud lays out the standard slices (MaxText's table).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
             128: (4, 4, 8), 192: (4, 4, 12), 256: (4, 8, 8), 512: (8, 8, 8),
             1024: (8, 8, 16), 2048: (8, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
             128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str           # as given
  generation: str     # key of CHIPS
  topology: str       # libtpu name, e.g. "v4:2x4x4"
  chips: int
  hosts: int
  chips_per_host: tuple
  wrap: tuple


def parse_slice(name: str) -> Slice:
  """A gcloud accelerator name (v4-64, v5litepod-16, v5e-64, v5p-8, v6e-8) or a libtpu
  topology name (v5e:2x2, v4:2x2x1) -> its generation, torus shape, chips and hosts."""
  if ":" in name:
    prefix, dims = name.split(":")
    generation = {c.topology_prefix: g for g, c in CHIPS.items()}.get(prefix)
    shape = tuple(int(d) for d in dims.split("x"))
    if generation is None or len(shape) != (3 if CHIPS[generation].three_d else 2):
      raise ValueError(f"--topology={name!r}: expected e.g. v5e:2x2, v6e:4x4, v4:2x2x1, "
                       "v5:2x2x2 (2-D for v5e and v6e, 3-D for v4 and v5p)")
    chips = int(np.prod(shape))
  else:
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
      raise ValueError(f"--topology={name!r}: expected e.g. v4-64, v5litepod-64, v5p-128, "
                       "v6e-8, or a libtpu name such as v5e:2x2")
    generation = "v5e" if match[1] == "v5litepod" else match[1]
    count = int(match[2])
    chips = count // 2 if CHIPS[generation].cores_in_name else count
    table = SHAPES_3D if CHIPS[generation].three_d else SHAPES_2D
    if chips not in table:
      raise ValueError(f"--topology={name!r}: {chips} chips; known slices have "
                       f"{sorted(table)} chips")
    shape = table[chips]
  chip = CHIPS[generation]
  if chip.three_d:
    per_host = (2, 2, 1) if chips >= 4 else shape
    # Slices of 64 chips and more are full tori (wraparound links on every axis).
    wrap = (chips >= 64,) * 3
  else:
    # One host holds up to 8 v5e/v6e chips (a v5litepod-8 is one VM); pods use 4 per host.
    per_host = (shape[0], shape[1], 1) if chips <= 8 else (2, 2, 1)
    wrap = tuple(d >= 16 for d in shape) + (False,)
  shape_name = "x".join(str(d) for d in shape)
  return Slice(name, generation, f"{chip.topology_prefix}:{shape_name}", chips,
               chips // int(np.prod(per_host)), per_host, wrap)


def slice_devices(s: Slice) -> list:
  """Compile-only devices of the slice (needs libtpu, not a TPU)."""
  from jax.experimental import topologies
  megacore = "megacore" if CHIPS[s.generation].cores_in_name else "default"
  topo = topologies.get_topology_desc(
      s.topology, "tpu", chip_config_name=megacore, chips_per_host_bounds=s.chips_per_host,
      num_slices=1, wrap=s.wrap)
  return list(topo.devices)


def lower_step(config, binary: str, devices):
  """(The run's jitted step lowered for `devices` with abstract state and batch, the mesh,
  the pretraining config's resolved values or None for fine-tuning).

  Nothing is read or placed on devices; the model's attention follows the target
  platform (devices[0].platform), not the host's. The config is not changed.
  """
  size, batch = config.model.image_size, config.batch_size
  derived = None
  if binary == "finetune":
    # As loop.setup, but no checkpoint is read (the step is the same), so none is required.
    eval_config.check(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.sharding.mesh, devices)
    parts = finetune.make_step(config, mesh, sharding.batch_sharding(mesh))
    abstract, step = parts.abstract, parts.step
    spec = {"image": ((batch, size, size, 3), jnp.uint8), "label": ((batch,), jnp.int32),
            "erase": ((batch, 4), jnp.int32)}
  else:
    config_checks.validate(config, num_devices=len(devices))
    derived = config_lib.resolve(config, devices[0].platform)
    built = ts.build(config, devices, materialize=False, derived=derived)
    mesh, abstract, step = built.mesh, built.abstract, built.step
    spec = {"image": ((batch, size, size, 3), jnp.uint8)}
  batch_spec = sharding.batch_sharding(mesh)
  batch_arg = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_spec)
               for k, (shape, dtype) in spec.items()}
  return step.lower(abstract, batch_arg), mesh, derived


# An HLO instruction "%name = <shape> opcode(...": the shape is a tensor such as
# f32[64,256]{1,0:T(8,128)} or a tuple of them.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+"
    r"(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(",
    re.MULTILINE)
_TENSOR = re.compile(r"\b(pred|[a-z]+[0-9]+)\[([0-9,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _tensor_bytes(shape_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _TENSOR.findall(shape_text):
    bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
    sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])) * bits // 8)
  return sizes


def collectives(hlo_text: str) -> dict:
  """{op: {"count", "bytes"}} of the collectives in optimised HLO text, per device.

  Bytes are the op's results. An async all-gather-start or
  collective-permute-start's tuple holds its operands, then its results (then
  u32[] scalars for the permute): only the results are counted.
  """
  out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for shape, op, start in _INSTRUCTION.findall(hlo_text):
    sizes = _tensor_bytes(shape)
    if start and op in ("all-gather", "collective-permute"):
      arrays = [b for b, (_, dims) in zip(sizes, _TENSOR.findall(shape), strict=True) if dims]
      sizes = arrays[len(arrays) // 2:]
    out[op]["count"] += 1
    out[op]["bytes"] += sum(sizes)
  return {op: v for op, v in out.items() if v["count"]}


_ENTRY_OP = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
               "slice-done", "after-all", "partition-id", "replica-id"}
# On-chip memory (VMEM) is memory space 1 in a TPU layout: f32[64,128]{1,0:T(8,128)S(1)}.
_ON_CHIP = re.compile(r"\b(?:pred|[a-z]+[0-9]+)\[[0-9,]*\]\{[^}]*S\(1\)[^}]*\}")


def _scope(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(Decoder))/block_1/mlp/fc1/dot' -> 'backward Decoder/block/mlp'
  (both decoders are "Decoder")."""
  parts = op_name.split("/")[1:]
  if not parts:
    return "other"
  # jvp: the differentiated forward; neither: no gradient (momentum encoder, masks, optimizer).
  phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name
           else "no-grad")
  names = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in parts]
  names = [re.sub(r"_\d+$", "", n) for n in names if n]
  return f"{phase} {'/'.join(names[:3])}"


def bytes_by_scope(hlo_text: str, top: int = 15) -> dict:
  """Bytes per device read and written by the top-level ops of the entry computation,
  grouped by the model scope of their op_name (the largest `top`; the rest as
  "rest"). Each op counts its operands and its result, as XLA's cost model does,
  but unpadded and without what while loops do inside, so the sum is below
  the cost model's "bytes accessed".
  """
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  sizes, totals = {}, {}
  for line in entry.splitlines()[1:]:
    match = _ENTRY_OP.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    sizes[name] = sum(_tensor_bytes(shape))
    if opcode in _NO_TRAFFIC:
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split(", metadata=")[0])
    moved = sizes[name] + sum(sizes.get(o, 0) for o in set(operands) if o != name)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    key = _scope(op_name.group(1)) if op_name else "other"
    if opcode in ("copy-start", "slice-start"):
      # The compiler's own prefetches into on-chip memory (and evictions out of
      # it): what moves is the on-chip part of the result, else the source.
      on_chip = sum(_tensor_bytes(" ".join(_ON_CHIP.findall(shape))))
      key = "prefetch to on-chip memory (copy-start, slice-start)"
      moved = on_chip or sum(sizes.get(o, 0) for o in set(operands))
    totals[key] = totals.get(key, 0) + moved
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])
  out = dict(ranked[:top])
  if ranked[top:]:
    out["rest"] = sum(v for _, v in ranked[top:])
  return out


def cost_analysis(compiled) -> dict:
  """The compiler's cost model of a compiled program, per device: {"flops", "bytes
  accessed", ...} ({} when it has none)."""
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def versions() -> dict:
  """{"jax", "libtpu"}: the versions of the compiler a report's numbers come from."""
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = None
  return {"jax": jax.__version__, "libtpu": libtpu}


def report(config, binary: str, s: Slice, devices, margin: float,
           breakdown: bool = False) -> dict:
  """Compiles the step for the slice; the JSON line's fields (module docstring)."""
  chip = CHIPS[s.generation]
  per_chip_batch = config.batch_size / len(devices)
  t0 = time.perf_counter()
  lowered, mesh, derived = lower_step(config, binary, devices)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  gb = lambda b: round(b / 1e9, 3)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  hbm = chip.hbm_gib * 2**30
  cost = cost_analysis(compiled)
  hlo = compiled.as_text()
  flop = cost.get("flops", 0.0) / per_chip_batch  # the cost model is per device
  moved = cost.get("bytes accessed", 0.0) / per_chip_batch
  analytic = analytic_flops_per_image(config, derived)
  # What the compiled step runs on the slice (the config's "auto" resolved for it).
  attention_impl = (derived.attention_impl if derived is not None
                    else config_attention.attention_impl(config, devices[0].platform))
  floor = fused_floor = None
  if derived is not None:
    floor = flops.floor_bytes_per_image(config, derived, per_chip_batch)
    fused_floor = flops.floor_bytes_per_image(config, derived, per_chip_batch,
                                              fused_attention=True)
  peak = flops.peak_tflops(devices[0]) * 1e12
  ridge = peak / (chip.hbm_gbps * 1e9)
  bound_s = max(flop / peak, moved / (chip.hbm_gbps * 1e9)) * per_chip_batch
  row = {
      "config": f"{config.model.size}/{config.model.patch_size}",
      "binary": binary, "topology": s.name, "libtpu_topology": s.topology,
      "chip": devices[0].device_kind, "chips": s.chips, "hosts": s.hosts,
      "devices": len(devices), "mesh": dict(mesh.shape),
      "batch": config.batch_size, "per_chip_batch": per_chip_batch,
      "attention_impl": attention_impl or "", "dtype": config.model.dtype,
      "remat": bool(config.model.get("remat", False)),
      "argument_gb": gb(mem.argument_size_in_bytes), "output_gb": gb(mem.output_size_in_bytes),
      "alias_gb": gb(mem.alias_size_in_bytes), "temp_gb": gb(mem.temp_size_in_bytes),
      "code_gb": gb(mem.generated_code_size_in_bytes), "total_gb": gb(total),
      "hbm_gb": gb(hbm), "margin": margin, "fits": total <= (1 - margin) * hbm,
      "compiled_gflop_per_image": round(flop / 1e9, 2),
      "analytic_gflop_per_image": round(analytic / 1e9, 2) if analytic else None,
      "compiled_over_analytic": round(flop / analytic, 3) if analytic else None,
      "gb_accessed_per_image": round(moved / 1e9, 4),
      "flop_per_byte": round(flop / moved, 1) if moved else None,
      # flops.floor_bytes_per_image: every product reads its operands and writes
      # its result once in bf16, all else fused into them; no unfused step beats it.
      "floor_gb_per_image": round(floor["total"] / 1e9, 4) if floor else None,
      "floor_flop_per_byte": round(analytic / floor["total"], 1) if floor else None,
      # The same with attention's products and softmax fused (pallas_short's kernels).
      "fused_attention_floor_gb_per_image": (round(fused_floor["total"] / 1e9, 4)
                                             if fused_floor else None),
      "ridge_flop_per_byte": round(ridge, 1),
      "bound": "compute" if flop / moved >= ridge else "memory",
      "roofline_step_ms": round(bound_s * 1e3, 2),
      "roofline_images_per_s_per_chip": round(per_chip_batch / bound_s, 1),
      "collectives": collectives(hlo),
      # XLA's cost model counts a while loop's body once, whatever its trip
      # count: FLOPs in loops (collective matmuls, scans) are under-counted.
      "while_loops": len(re.findall(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=.*?\swhile\(", hlo,
                                    re.MULTILINE)),
      # Pallas (Mosaic) kernels: the cost model counts only what a kernel
      # declares (flash attention's forward declares its FLOPs, its backward
      # kernels nothing), so FLOPs are under-counted when this is not 0.
      "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
      "compile_s": round(compile_s, 1),
      **versions(),
  }
  if breakdown:
    row["gb_per_image_by_scope"] = {k: round(v / per_chip_batch / 1e9, 4)
                                     for k, v in bytes_by_scope(hlo).items()}
  return row


def block_report(config, part: str, s: Slice, device) -> dict:
  """The compiler's count for one transformer block of `part` on one chip: the quick way to
  try a change to the block (attention_impl, dtype) before compiling the whole step.
  BEiT-v2 (method = "beitv2") has the encoder only: every token, its shared relative
  position bias [1, heads, T, T] trained with the block."""
  config_checks.validate(config)
  d = config_lib.resolve(config, device.platform)
  width, heads, n, k = d.width, d.heads, d.num_patches, len(d.blocks)
  beit = config.get("method", "ddae") == "beitv2"
  if beit and part != "encoder":
    raise ValueError(f"--block={part}: a BEiT-v2 config has only the encoder")
  per_chip = config.batch_size // s.chips
  tokens, batch, train = {
      "encoder": (n + 1 if beit else n - d.num_masked + 1, per_chip, True),
      "momentum_encoder": (n + 1, per_chip, False),
      "pixel_decoder": (n + 1, per_chip * k, True),
      "distill_decoder": (n + 1, per_chip * k, True)}[part]
  if part == "pixel_decoder":
    width, heads = config.pixel.decoder_width, config.pixel.decoder_heads
  dtype = jnp.dtype(config.model.dtype)
  block = Block(heads, dtype=dtype, attention_impl=d.attention_impl,
                layer_scale=config.model.get("layer_scale", 0.0))
  on_chip = jax.sharding.SingleDeviceSharding(device)
  params = jax.eval_shape(lambda: block.init(jax.random.key(0),
                                             jnp.zeros((1, tokens, width), dtype)))
  params = runtime.with_shardings(params, jax.tree.map(lambda _: on_chip, params))
  args = [params, jax.ShapeDtypeStruct((batch, tokens, width), dtype, sharding=on_chip)]
  if config.model.get("rel_pos_bias", False) and part in ("encoder", "momentum_encoder"):
    args.append(jax.ShapeDtypeStruct((1, heads, tokens, tokens), jnp.float32, sharding=on_chip))

  def loss(params, x, bias=None):
    return jnp.sum(block.apply(params, x, True, bias).astype(jnp.float32) ** 2)

  fn = jax.grad(loss, argnums=tuple(range(len(args)))) if train else loss
  cost = cost_analysis(jax.jit(fn).lower(*args).compile())
  return {"block": part, "tokens": tokens, "width": width, "heads": heads, "batch": batch,
          "train": train, "bias": len(args) == 3, "attention_impl": d.attention_impl,
          "dtype": config.model.dtype, "gflop": round(cost.get("flops", 0.0) / 1e9, 2),
          "gb_accessed": round(cost.get("bytes accessed", 0.0) / 1e9, 4),
          "flop_per_byte": round(cost["flops"] / cost["bytes accessed"], 1),
          "chip": device.device_kind, **versions()}


def analytic_flops_per_image(config, derived: config_lib.Derived | None) -> float | None:
  """flops.py's count: the pretraining step's total (`derived`: its resolved values), or
  a classifier's 3x forward (None)."""
  if derived is not None:
    return flops.train_flops_per_image(config, derived)["total"]
  width, depth, _ = config_lib.encoder_dims(config)
  n = (config.model.image_size // config.model.patch_size) ** 2
  return 3 * flops.encoder_forward_flops(n + 1, width, depth, config.model.patch_size ** 2 * 3)


def is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "exceeds" in text


def try_report(config, binary: str, s: Slice, devices, margin: float,
               breakdown: bool = False) -> dict:
  """report(), or fits=false with the compiler's message when it runs out of HBM."""
  try:
    return report(config, binary, s, devices, margin, breakdown)
  except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory is a result
    if not is_oom(err):
      raise
    return {"topology": s.name, "batch": config.batch_size,
            "per_chip_batch": config.batch_size / len(devices), "fits": False,
            "error": str(err).strip().splitlines()[0][:300]}


def sweep(config, binary: str, s: Slice, devices, margin: float):
  """Yields a row per per-chip batch: doubling from the config's while it fits, else
  halving until it does (powers of two times the config's per-chip batch). Each row
  compiles a copy of the config with that batch; `config` is not changed."""
  per_chip = max(1, config.batch_size // len(devices))
  direction = None
  while per_chip >= 1:
    config = copy.deepcopy(config)
    config.batch_size = per_chip * len(devices)
    row = try_report(config, binary, s, devices, margin)
    yield row
    direction = direction or (2 if row["fits"] else 0.5)
    if row["fits"] != (direction == 2):
      return
    per_chip = int(per_chip * direction)

