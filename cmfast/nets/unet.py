"""The UNets of EDM (networks.py): SongUNet, the DDPM++ / NCSN++ architectures of Song et al. 2021 that the CM
paper uses for CIFAR-10, and DhariwalUNet (arch="adm"), the ADM architecture of Dhariwal & Nichol 2021 that it uses
for ImageNet 64x64 and LSUN. Module names follow EDM so its layouts (and checkpoints) are recognisable."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..precond import under_torch_func
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, embedding modulation, GN-SiLU-dropout-conv, skip; optional self-attention.
    adaptive_scale=False (DDPM++/NCSN++): the embedding is added before norm1; True (ADM): act(GN(x)(1+s)+b)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int = 1, dropout: float = 0.0,
                 skip_scale: float = math.sqrt(0.5), eps: float = 1e-6, resample_filter=(1, 1),
                 resample_proj: bool = True, adaptive_scale: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        if self.num_heads and out_channels % self.num_heads:     # a reshape failed at the first call
            raise ValueError(f"num_heads: expected a divisor of the {out_channels} channels of an attention block, "
                             f"got {num_heads}")
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def constants(self, emb: torch.Tensor, dtype: torch.dtype) -> tuple:
        """What the block computes from the embedding alone, in the activations' dtype: (scale, shift) for
        adaptive_scale, else the per-channel add before norm1 (the affine output plus conv0's bias, (N, C));
        and the bias of the residual join (conv1's plus the skip convolution's, or None). A sampler whose noise
        level is fixed computes these once (GraphedSampler) instead of on every call."""
        # The convolutions' biases are added where another add happens anyway: conv0's with the embedding (DDPM++),
        # conv1's and the skip convolution's in the residual join (ops.residual: one fused pass where eager PyTorch
        # ran three full-tensor kernels). The same sums as EDM's block, in another order. Each bias is first cast to
        # the activations' dtype, as autocast's convolution cast it, so a copy stored in that dtype (GraphedSampler)
        # computes the same numbers.
        params = self.affine(emb).to(dtype)
        if self.adaptive_scale:
            mod = tuple(params.chunk(2, dim=1))
        else:
            if self.conv0.bias is not None:
                params = params + self.conv0.bias.to(dtype)
            mod = params
        biases = [c.bias.to(dtype) for c in (self.conv1, self.skip) if c is not None and c.bias is not None]
        return mod, (sum(biases[1:], biases[0]) if biases else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None, consts: tuple | None = None) -> torch.Tensor:
        """consts: this block's constants(emb, dtype) computed ahead (then emb is not used)."""
        orig = x
        if self.adaptive_scale:
            x = self.conv0(self.norm0(x, act="silu"))
            mod, res_bias = self.constants(emb, x.dtype) if consts is None else consts
            x = self.norm1(x, scale=mod[0], shift=mod[1], act="silu")
        else:
            x = self.conv0(self.norm0(x, act="silu"), add_bias=False)
            mod, res_bias = self.constants(emb, x.dtype) if consts is None else consts
            x = self.norm1(x, pre_bias=mod, act="silu")     # GN(x + mod): one pass in the Triton kernel
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training), add_bias=False)
        skip = self.skip(orig, add_bias=False) if self.skip is not None else orig
        x = ops.residual(x, skip, res_bias, self.skip_scale)
        if self.num_heads:
            N, C, H, W = x.shape
            D = C // self.num_heads
            # qkv channel layout (head, d, 3) as in EDM; attention over the H*W positions.
            qkv = self.qkv(self.norm2(x)).reshape(N, self.num_heads, D, 3, H * W)
            # q, k, v dense (N, heads, L, D), made in one copy: as views of the qkv output their head dim has stride 3
            # (channels interleaved), and the H200 profile of the batch-256 sample put the Triton forward on such
            # views at 5.9 ms against 0.45 ms on dense copies (SDPA's fused kernels need stride(-1) = 1 as well).
            q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
            a = ops.attention(q, k, v)                                      # (N, heads, L, D)
            a = a.transpose(-1, -2).reshape(N, C, H, W)
            a = self.proj(a, add_bias=False)
            x = ops.residual(a, x, None if self.proj.bias is None else self.proj.bias.to(a.dtype), self.skip_scale)
        return x


def check_class_indices(labels: torch.Tensor, label_dim: int, values: bool = True) -> None:
    """One-line ValueErrors for class indices that are not integers (floats, complex, bools) or, with `values` (one
    host sync for a CUDA tensor), outside [0, label_dim)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels: expected integer class indices, got {labels.dtype}")
    if values and labels.numel():
        lo, hi = torch.stack(torch.aminmax(labels)).tolist()
        if lo < 0 or hi >= label_dim:
            raise ValueError(f"class_labels: expected 0 <= label < {label_dim}, got {lo if lo < 0 else hi}")


class UNet(nn.Module):
    """EDM's SongUNet, or with arch="adm" its DhariwalUNet. F(x_in, c_noise, class_labels) -> F, the raw network of
    the preconditioned model.

    arch="adm" (ADM): scale/shift modulation (adaptive_scale=False: ADM without it, guided-diffusion's
    use_scale_shift_norm=False, as in the CM paper's LSUN models), 64 channels per attention head, attention in every
    block at the attention resolutions, no skip scaling, resampling-only skips, GroupNorm eps 1e-5, an embedding
    without the sin/cos swap whose class label is added after the second layer; embedding_type, channel_mult_noise,
    encoder_type, resample_filter and num_heads are SongUNet's and must stay at their defaults.
    Initialization follows cmfast's (Xavier-uniform), not ADM's Kaiming-uniform: the same functions, not the same
    random draws as an EDM run."""

    def __init__(self,
                 img_resolution: int = 32,          # Image size (square).
                 in_channels: int = 3,              # Channels of the image.
                 out_channels: int | None = None,   # Output channels (default: in_channels).
                 label_dim: int = 0,                # Number of class labels, 0 = unconditional.
                 model_channels: int = 128,         # Base channel count.
                 channel_mult=(2, 2, 2),            # Channel multiplier per resolution.
                 channel_mult_emb: int = 4,         # Embedding width = model_channels * this.
                 num_blocks: int = 4,               # Residual blocks per resolution.
                 attn_resolutions=(16,),            # Resolutions with self-attention.
                 dropout: float = 0.10,             # Dropout probability in the residual blocks.
                 embedding_type: str = "positional",  # 'positional' (DDPM++) or 'fourier' (NCSN++).
                 fourier_scale: float = 16.0,       # std of the Fourier frequencies (NCSN++ 16; iCT's CIFAR-10: 0.02).
                 channel_mult_noise: int = 1,       # Noise-embedding width = model_channels * this.
                 encoder_type: str = "standard",    # 'standard' (DDPM++) or 'residual' (NCSN++).
                 resample_filter=(1, 1),            # (1, 1) box (DDPM++) or (1, 3, 3, 1) FIR (NCSN++).
                 adaptive_scale: bool | None = None,  # Scale/shift after GroupNorm (None: SongUNet no, ADM yes).
                 num_heads: int = 1,                # Attention heads.
                 arch: str = "song",                # 'song' (SongUNet: DDPM++ / NCSN++) or 'adm' (DhariwalUNet).
                 noise_scale: float = 1.0):         # c_noise multiplier (1000: openai/consistency_models' nets).
        super().__init__()
        # Sizes are checked here: a negative one failed in a layer ('Trying to create tensor with negative
        # dimension'), in_channels=0 or dropout=2 built a net that failed at its first call or training step.
        for name, v, lo in (("img_resolution", img_resolution, 1), ("in_channels", in_channels, 1),
                            ("out_channels", 1 if out_channels is None else out_channels, 1),
                            ("label_dim", label_dim, 0), ("model_channels", model_channels, 1),
                            ("channel_mult_emb", channel_mult_emb, 1), ("num_blocks", num_blocks, 0),
                            ("channel_mult_noise", channel_mult_noise, 1), ("num_heads", num_heads, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        # channel_mult=2 failed as "'int' object is not iterable", attn_resolutions=16 as "argument of type 'int' is
        # not iterable" (and '16' as "'in <string>' requires string as left operand")
        if not isinstance(channel_mult, (tuple, list)) or not channel_mult or \
                not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in channel_mult):
            raise ValueError(f"channel_mult: expected one or more integers >= 1, got {channel_mult!r}")
        if not isinstance(attn_resolutions, (tuple, list, set, frozenset)) or \
                not all(isinstance(r, int) and not isinstance(r, bool) for r in attn_resolutions):
            raise ValueError(f"attn_resolutions: expected a tuple of resolutions (ints, e.g. (16,)), got "
                             f"{attn_resolutions!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, (int, float)) or \
                not 0 < fourier_scale < math.inf:
            raise ValueError(f"fourier_scale: expected a positive number, got {fourier_scale!r}")
        if arch not in ("song", "adm"):
            raise ValueError(f"arch: expected 'song' (DDPM++ / NCSN++) or 'adm', got {arch!r}")
        if arch == "adm":
            song_only = dict(embedding_type=(embedding_type, "positional"), channel_mult_noise=(channel_mult_noise, 1),
                             encoder_type=(encoder_type, "standard"), resample_filter=(tuple(resample_filter), (1, 1)),
                             num_heads=(num_heads, 1), fourier_scale=(float(fourier_scale), 16.0))
            for name, (got, default) in song_only.items():
                if got != default:
                    raise ValueError(f"{name}: SongUNet's option, fixed in arch 'adm' (got {got!r})")
        self.arch, self.noise_scale = arch, float(noise_scale)
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type: expected 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"encoder_type: expected 'standard' or 'residual', got {encoder_type!r}")
        step = 1 << (len(channel_mult) - 1)     # each resolution halves the last: an odd one broke the skip concat
        if img_resolution % step:
            raise ValueError(f"img_resolution: expected a multiple of {step} ({len(channel_mult)} resolutions, each "
                             f"half the last), got {img_resolution}")
        out_channels = in_channels if out_channels is None else out_channels
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        if arch == "adm":
            self._build_adm(model_channels, channel_mult, emb_channels, num_blocks, attn_resolutions, dropout,
                            adaptive_scale is not False)
            return
        adaptive_scale = bool(adaptive_scale)
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, resample_filter=resample_filter,
                     adaptive_scale=adaptive_scale)

        # Mapping: noise level (and label) -> embedding.
        self.map_noise = (PositionalEmbedding(noise_channels) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels, scale=float(fourier_scale)))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, init_weight=1e-5)

    def _build_adm(self, model_channels, channel_mult, emb_channels, num_blocks, attn_resolutions, dropout, adaptive):
        """EDM's DhariwalUNet layout and names (networks.py), from cmfast's layers."""
        res0 = self.img_resolution
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(self.label_dim, emb_channels, bias=False) if self.label_dim else None

        def blk(cin, cout, attention=False, **kw):
            return UNetBlock(cin, cout, emb_channels, attention=attention, num_heads=cout // 64,   # 0: none
                             dropout=dropout, skip_scale=1.0, eps=1e-5, resample_proj=False, adaptive_scale=adaptive,
                             **kw)
        self.enc = nn.ModuleDict()
        cout = self.in_channels
        for level, mult in enumerate(channel_mult):
            res = res0 >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = blk(cout, cout, down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = blk(cin, cout, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = res0 >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = blk(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = blk(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = blk(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = blk(cin, cout, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, self.out_channels, 3, init_weight=1e-5)

    def embedding(self, noise_labels: torch.Tensor, class_labels=None, batch: int | None = None) -> torch.Tensor:
        """The mapping network: noise level (and class label) -> the blocks' embedding, (batch, emb_channels)."""
        if not isinstance(noise_labels, torch.Tensor):   # failed as "'float' object has no attribute 'reshape'"
            raise TypeError(f"noise_labels: expected a tensor of c_noise values (B,) (ln(sigma) / 4), got "
                            f"{type(noise_labels).__name__}")
        if batch is not None and noise_labels.numel() not in (1, batch):   # failed inside expand
            raise ValueError(f"noise_labels: expected one value or one per image ({batch},), got shape "
                             f"{tuple(noise_labels.shape)}")
        noise_labels = noise_labels.reshape(-1)
        if self.noise_scale != 1.0:     # openai/consistency_models' networks take 1000 ln(sigma) / 4
            noise_labels = noise_labels * self.noise_scale
        emb = self.map_noise(noise_labels if batch is None else noise_labels.expand(batch))
        labels = None
        if self.map_label is None and class_labels is not None:     # were ignored: unconditional images, no error
            raise ValueError("class_labels: this network is unconditional (label_dim 0); pass class_labels=None")
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels: this network is conditional on {self.label_dim} classes")
            given = isinstance(class_labels, torch.Tensor)
            labels = class_labels if given else torch.as_tensor(class_labels)   # a list: checked on the CPU, moved
            if given and labels.device != emb.device:   # failed inside the label layer's add with torch's device error
                raise ValueError(f"class_labels: expected a tensor on {emb.device} (the images' device), got one on "
                                 f"{labels.device}")
            if labels.dim() == 1:
                idx = self._checked_indices(labels)
                labels = F.one_hot(idx, self.label_dim) if not under_torch_func() else \
                    idx[:, None] == torch.arange(self.label_dim, device=idx.device)   # one_hot has no vmap rule
            elif labels.dim() != 2 or labels.shape[1] != self.label_dim:
                raise ValueError(f"class_labels: expected class indices (B,) or one-hot rows (B, {self.label_dim}), "
                                 f"got shape {tuple(labels.shape)}")
            if labels.shape[0] != emb.shape[0] and not (batch is None and emb.shape[0] == 1):
                # one label was broadcast over the whole batch; another count failed inside an add
                raise ValueError(f"class_labels: expected one label per image ({emb.shape[0]}), got "
                                 f"{labels.shape[0]}")
            labels = labels.to(device=emb.device, dtype=emb.dtype)
        if self.arch == "adm":     # DhariwalUNet: cos/sin as computed, the label after the second layer
            emb = self.map_layer1(F.silu(self.map_layer0(emb)))
            return F.silu(emb if labels is None else emb + self.map_label(labels))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)   # sin/cos order as in EDM
        if labels is not None:
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def _checked_indices(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices as int64, refused when not integers (1.5 would become class 1) or, where a check costs no
        device sync (CPU tensors), outside [0, label_dim)."""
        check_class_indices(labels, self.label_dim, values=labels.device.type == "cpu"
                            and not torch.compiler.is_compiling() and not under_torch_func())
        return labels.long()

    def blocks(self) -> list[UNetBlock]:
        """The residual blocks in the order forward runs them."""
        return [b for b in (*self.enc.values(), *self.dec.values()) if isinstance(b, UNetBlock)]

    def constants(self, noise_labels: torch.Tensor, class_labels=None, dtype: torch.dtype = torch.float32,
                  batch: int | None = None) -> list[tuple]:
        """Every block's constants (UNetBlock.constants) for these noise levels: what forward(..., constants=)
        takes in place of the mapping network and the blocks' embedding layers. Call it under the autocast the
        forward will run in, with dtype the activations' dtype there."""
        emb = self.embedding(noise_labels, class_labels, batch)
        return [blk.constants(emb, dtype) for blk in self.blocks()]

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor | None, class_labels=None,
                constants: list[tuple] | None = None) -> torch.Tensor:
        """constants: self.constants(...) computed ahead for these noise levels and labels (GraphedSampler, whose
        noise levels are fixed); noise_labels and class_labels are then not read."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.img_resolution, self.img_resolution) or \
                not x.shape[0]:     # batch 0 failed in the embedding's reshape
            raise ValueError(f"x: expected images (B, {self.in_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}) with B >= 1 for this network, got {tuple(x.shape)}")
        w = self.out_conv.weight
        if x.device != w.device:    # torch's device error from the first convolution
            raise ValueError(f"x: expected a tensor on {w.device} (the network's device), got one on {x.device}")
        if constants is None and isinstance(noise_labels, torch.Tensor) and noise_labels.device != x.device:
            raise ValueError(f"noise_labels: expected a tensor on {x.device} (the images' device), got one on "
                             f"{noise_labels.device}")
        if constants is not None and len(constants) != len(self.blocks()):
            raise ValueError(f"constants: expected one entry per residual block ({len(self.blocks())}), got "
                             f"{len(constants)}: pass what UNet.constants returns")
        emb = self.embedding(noise_labels, class_labels, x.shape[0]) if constants is None else None
        consts = iter(constants) if constants is not None else None

        def block(blk, x):
            return blk(x, emb, None if consts is None else next(consts))

        skips, aux = [], x
        for name, blk in self.enc.items():
            if "aux_residual" in name:
                x = skips[-1] = aux = (x + blk(aux)) / math.sqrt(2)
            else:
                x = block(blk, x) if isinstance(blk, UNetBlock) else blk(x)
                skips.append(x)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(blk, x)
        return self.out_conv(self.out_norm(x, act="silu"))


def architecture(cfg: dict) -> dict:
    """A UNet config with every default filled in and dropout left out (it shapes no weight): two configs whose
    architecture() is equal have interchangeable weights (a CD student starts from its teacher's)."""
    import inspect
    full = {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items() if k != "self"}
    full.update(cfg)
    full.pop("dropout", None)
    if full.get("adaptive_scale") is None:
        full["adaptive_scale"] = full.get("arch") == "adm"
    if full.get("out_channels") is None:
        full["out_channels"] = full["in_channels"]
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in full.items()}


def adopt_time_scale(student: dict, teacher: dict) -> dict:
    """The student's UNet config with its teacher's noise_scale where that is all (besides dropout) that keeps the
    two from sharing weights: a student initialized from openai/consistency_models' EDM teacher (time 1000 ln(sigma)
    / 4) must read time on the same scale as the weights it starts from."""
    t = architecture(teacher)["noise_scale"]
    adopted = {**student, "noise_scale": t}
    if t != architecture(student)["noise_scale"] and architecture(adopted) == architecture(teacher):
        return adopted
    return student
