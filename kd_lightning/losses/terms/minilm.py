from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.transformer import block_index, network_name, transformer_blocks

ATTENTION = "attention"
VECTORS = "qkv"


class MiniLM(DistillTerm):
    """Self-attention distillation for vision transformers: MiniLM (Wang et al., NeurIPS 2020), MiniLMv2
    (Wang et al., Findings of ACL 2021) and MiniViT's attention and hidden-state relations (Zhang et al.,
    CVPR 2022; microsoft/Cream MiniViT/Mini-Swin main.py).

    Each entry of `relations` is a KL(teacher ‖ student) between row-softmaxed relation matrices, averaged over
    batch, heads and query tokens (MiniLM's 1/(A_h·|x|) Σ_a Σ_t D_KL), then over the paired layers:

    - two letters of q, k, v (`qq`, `kk`, `vv`, `qk`, ...): MiniLMv2's multi-head relation
      softmax(X_a Y_aᵀ / √d_r), X and Y read from the block's `attn.qkv` projection, the heads' vectors
      concatenated and split into `relation_heads` relation heads (null: the teacher's attention head count).
      Student and teacher may then differ in width and head count; the relation head count must divide both
      widths. With both networks' own head count, `vv` is MiniLM v1's value relation and `qk` its attention.
    - `attention`: the attention probabilities the network computed (MiniLM v1's attention transfer), read at
      `attn.attn_drop`'s input, which equals its output in eval mode and is B×H×N×N after the softmax, so
      masks and q/k normalisation are included. Student and teacher need the same head count. timm's fused
      kernel never materialises them, so `resolve_model_taps` sets `fused_attn = False` on exactly the
      tapped attention modules (listed in `unfused_attention`), which stay unfused for this run's networks.

    `hidden_relation_weight` > 0 adds MiniViT's hidden-state relation (`functional.hidden_relation_mse` of
    the paired blocks' outputs) as the part `hidden`, times that weight. With `average_relations` the
    relation KLs are averaged into one part `attention` (MiniViT's /9 over its nine q/k/v pairs); otherwise
    each is its own part and they add up (MiniLMv2's L_QQ + L_KK + L_VV).

    Layers are block indices (−1 = last). Defaults are MiniLMv2's recipe for a base-size teacher: Q-Q, K-K,
    V-V relations of the teacher's last block to the student's last block (for large teachers the paper
    takes an upper-middle layer instead, e.g. `teacher_layers=[-4]`). Every relation compares token i with
    token j, so both networks must see the same number of tokens (same image size and patch grid).
    """

    def __init__(self, weight: float = 1.0, relations: Sequence[str] = ("qq", "kk", "vv"),
                 relation_heads: int | None = None, student_layers: int | Sequence[int] = (-1,),
                 teacher_layers: int | Sequence[int] = (-1,), average_relations: bool = False,
                 hidden_relation_weight: float = 0.0, warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.relations = list(as_tap_list(relations))
        unknown = [r for r in self.relations if r != ATTENTION and (len(r) != 2 or set(r) - set(VECTORS))]
        if not self.relations or unknown:
            raise ConfigError(
                f"distill.minilm.relations={self.relations} holds {unknown or 'nothing'}: each relation is "
                f"'attention' (the attention probabilities) or two letters of q, k, v such as qq, kk, vv, qk. "
                f"MiniLMv2 uses [qq, kk, vv], MiniLM v1 [attention, vv]."
            )
        self.student_layers = [int(i) for i in ([student_layers] if isinstance(student_layers, int) else student_layers)]
        self.teacher_layers = [int(i) for i in ([teacher_layers] if isinstance(teacher_layers, int) else teacher_layers)]
        if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError(
                f"distill.minilm pairs student_layers={self.student_layers} with teacher_layers="
                f"{self.teacher_layers} one to one, so both lists need the same non-zero length."
            )
        if relation_heads is not None and relation_heads < 1:
            raise ConfigError(f"distill.minilm.relation_heads must be >= 1 (or null for the teacher's attention "
                              f"head count), got {relation_heads}.")
        if hidden_relation_weight < 0:
            raise ConfigError(f"distill.minilm.hidden_relation_weight must be >= 0, got {hidden_relation_weight}.")
        self.relation_heads = relation_heads
        self.average_relations = bool(average_relations)
        self.hidden_relation_weight = float(hidden_relation_weight)
        self.unfused_attention: list[str] = []
        self._student_paths: list[str] = []
        self._teacher_paths: list[str] = []
        self._teacher_heads: list[int] = []
        self._heads = 0

    @property
    def reads_vectors(self) -> bool:
        return any(r != ATTENTION for r in self.relations)

    def resolve_model_taps(self, student: nn.Module, teacher: nn.Module) -> None:
        self._student_paths = self._block_paths(student, "student", self.student_layers, "student_layers")
        self._teacher_paths = self._block_paths(teacher, "teacher", self.teacher_layers, "teacher_layers")
        self._teacher_heads = [int(dict(teacher.named_modules())[f"{p}.attn"].num_heads) for p in self._teacher_paths]
        self.student_taps = [tap for path in self._student_paths for tap in self._taps(path)]
        self.teacher_taps = [tap for path in self._teacher_paths for tap in self._taps(path)]

    def _block_paths(self, model: nn.Module, role: str, layers: list[int], option: str) -> list[str]:
        blocks = transformer_blocks(model, role, "minilm")
        prefix = next(name for name, module in model.named_modules() if module is blocks)
        paths = []
        for layer in layers:
            index = block_index(layer, len(blocks), f"distill.minilm.{option}", model, role)
            attention = blocks[index].attn
            uses_qk = any(set(r) & {"q", "k"} for r in self.relations if r != ATTENTION)
            if uses_qk and not (isinstance(getattr(attention, "q_norm", nn.Identity()), nn.Identity)
                                and isinstance(getattr(attention, "k_norm", nn.Identity()), nn.Identity)):
                raise ConfigError(
                    f"Block {index} of the {role} {network_name(model, role)!r} normalises its queries and keys "
                    f"after the qkv projection, so q/k relations read from that projection would not be the ones "
                    f"its attention uses. Use relations=[attention, vv] (the probabilities it computes) for it."
                )
            if ATTENTION in self.relations and getattr(attention, "fused_attn", False):
                # The fused kernel never materialises the probabilities that the attn_drop tap reads.
                attention.fused_attn = False
                self.unfused_attention.append(f"{role}:{prefix}.{index}.attn")
            paths.append(f"{prefix}.{index}")
        return paths

    def _taps(self, block: str) -> list[str]:
        taps = [f"{block}.attn.qkv"] if self.reads_vectors else []
        if ATTENTION in self.relations:
            taps.append(f"{block}.attn.attn_drop:input")
        if self.hidden_relation_weight > 0:
            taps.append(block)
        return taps

    def build(self, context: BuildContext) -> None:
        for student_path, teacher_path, teacher_heads in zip(self._student_paths, self._teacher_paths,
                                                             self._teacher_heads):
            pairs = list(zip(self._taps(student_path), self._taps(teacher_path)))
            for student_tap, teacher_tap in pairs:
                if student_tap not in context.student_shapes or teacher_tap not in context.teacher_shapes:
                    raise ConfigError(
                        f"distill.minilm's tap {student_tap!r}/{teacher_tap!r} saw no tensor in the example forward: "
                        f"the attention module does not pass its probabilities through attn_drop. Use a timm "
                        f"VisionTransformer-style model, or relations of q, k, v only (e.g. [qq, kk, vv])."
                    )
                student_shape, teacher_shape = context.student_shapes[student_tap], context.teacher_shapes[teacher_tap]
                if student_shape[-2] != teacher_shape[-2]:
                    raise ConfigError(
                        f"distill.minilm relates every token to every other token, but the student's block "
                        f"{student_path!r} sees {student_shape[-2]} tokens and the teacher's {teacher_path!r} "
                        f"{teacher_shape[-2]}. Give both networks the same image size and patch size (the same "
                        f"patch grid) and the same number of class/distillation tokens."
                    )
                if student_tap.endswith(":input") and student_shape[1] != teacher_shape[1]:
                    raise ConfigError(
                        f"distill.minilm's 'attention' relation compares attention heads one to one, but the "
                        f"student's block {student_path!r} has {student_shape[1]} heads and the teacher's "
                        f"{teacher_path!r} {teacher_shape[1]}. Use relations of q, k, v (MiniLMv2, e.g. [qq, kk, "
                        f"vv]) with relation_heads, which allow different head counts."
                    )
            if self.reads_vectors:
                heads = self.relation_heads or teacher_heads
                widths = {"student": context.student_shapes[pairs[0][0]][-1] // 3,
                          "teacher": context.teacher_shapes[pairs[0][1]][-1] // 3}
                indivisible = {role: width for role, width in widths.items() if width % heads}
                if indivisible:
                    raise ConfigError(
                        f"distill.minilm splits the concatenated q/k/v vectors into {heads} relation heads, which "
                        f"does not divide the attention width {indivisible} (student {widths['student']}, teacher "
                        f"{widths['teacher']}). Set distill.minilm.relation_heads to a common divisor of both "
                        f"widths."
                    )
                self._heads = heads

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        per_relation: dict[str, Tensor] = {}
        hidden: Tensor | None = None
        for student_path, teacher_path in zip(self._student_paths, self._teacher_paths):
            student, teacher = inputs.student_features, inputs.teacher_features
            for relation in self.relations:
                if relation == ATTENTION:
                    value = functional.attention_probability_kl(student[f"{student_path}.attn.attn_drop:input"],
                                                                teacher[f"{teacher_path}.attn.attn_drop:input"])
                else:
                    value = functional.relation_kl(
                        self._relation(student[f"{student_path}.attn.qkv"], relation),
                        self._relation(teacher[f"{teacher_path}.attn.qkv"], relation))
                per_relation[relation] = per_relation.get(relation, 0) + value / len(self._student_paths)
            if self.hidden_relation_weight > 0:
                value = functional.hidden_relation_mse(student[student_path], teacher[teacher_path])
                hidden = (0 if hidden is None else hidden) + value / len(self._student_paths)
        parts = ({ATTENTION: sum(per_relation.values()) / len(per_relation)} if self.average_relations
                 else per_relation)
        if hidden is not None:
            parts["hidden"] = self.hidden_relation_weight * hidden
        return parts

    def _relation(self, qkv: Tensor, relation: str) -> Tensor:
        vectors = qkv.chunk(3, dim=-1)  # timm lays the projection out as (q | k | v), each head-major
        first, second = (vectors[VECTORS.index(letter)] for letter in relation)
        return functional.self_attention_relation(first, second, self._heads)
