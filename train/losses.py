"""The losses of stage 2 (the modality adapter): cross-entropy on the response, distillation from the LLM
reading the transcript, CTC pre-alignment against the LLM's word embeddings with its commitment term (or
against the characters a character head spells), and
`AdapterObjective`, the module that combines them as the config weighs them.

Speech reaches the LLM in training as it does when served: one position per adapter output (the paper's
"embeddings" readout), or, for a CTC-trained adapter, one vector per word piece its greedy CTC readout hears
(`training_readout`), each prompt laid out after its clip is read (`readout_prompts`)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from blsp_chat.characters import BLANK
from blsp_chat.constants import IGNORE_INDEX
from blsp_chat.model import BlspModel
from blsp_chat.prompt import PromptTemplate, Turn, pad_token_id, render, template_for
from blsp_chat.readout import ctc_readout, embedding_distance_logits
from train.adapter_config import LossSection
from train.speech_data import EncoderCache, FrameMasking, collate_tokens, speech_embeddings

WRAPPER_PREFIX = "blsp."  # parameter names inside AdapterObjective


def response_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits that predict each response/EOS token, in order: (N, V), targets (N,)."""
    predicting = logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return predicting[keep], targets[keep]


def response_span(labels: torch.Tensor) -> int:
    """How many trailing positions hold every response token and the position that predicts the first:
    the LLM's head (a 576 x 49152 product per position for SmolLM2) need not run on the prompt."""
    learned = (labels != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(learned[0]) + 1 if len(learned) else 1


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    chosen, targets = response_logits(logits, labels)
    return nn.functional.cross_entropy(chosen.float(), targets)


def distillation_kl(student_logits: torch.Tensor, student_labels: torch.Tensor, teacher_logits: torch.Tensor,
                    teacher_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at the response positions, mean per token,
    scaled by T^2. Both views must carry the same response tokens (checked)."""
    student, s_targets = response_logits(student_logits, student_labels)
    teacher, t_targets = response_logits(teacher_logits, teacher_labels)
    if not torch.equal(s_targets.cpu(), t_targets.cpu()):
        raise ValueError("speech and transcript views carry different responses; cannot distil")
    log_p_student = nn.functional.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = nn.functional.log_softmax(teacher.float() / temperature, dim=-1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def embedding_ctc(speech_embeds: Sequence[torch.Tensor], targets: Sequence[Sequence[int]], embeddings: torch.Tensor,
                  blank_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC between each clip's adapter outputs (L_i, d) and its transcript's token ids, the classes being the
    LLM's vocabulary with `blank_id` as the blank (`padded_ctc`).
    Also returns the commitment: the mean squared distance of each real vector to its nearest embedding."""
    lengths = torch.tensor([e.shape[0] for e in speech_embeds])
    padded = nn.utils.rnn.pad_sequence(list(speech_embeds), batch_first=True)
    logits = embedding_distance_logits(padded, embeddings)
    ctc = padded_ctc(logits, lengths, targets, blank_id)
    real = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    nearest = (padded.float() ** 2).sum(-1) - logits.max(-1).values   # ||x - e||^2 of the closest e
    return ctc, nearest[real.to(nearest.device)].mean()


def character_ctc(speech_embeds: Sequence[torch.Tensor], targets: Sequence[Sequence[int]],
                  head: nn.Module) -> torch.Tensor:
    """CTC between each clip's adapter outputs (L_i, d), classified by the character head, and its
    transcript's character classes (`characters.spell`; blank = class 0)."""
    lengths = torch.tensor([e.shape[0] for e in speech_embeds])
    padded = nn.utils.rnn.pad_sequence(list(speech_embeds), batch_first=True)
    return padded_ctc(head(padded).float(), lengths, targets, BLANK)


def padded_ctc(logits: torch.Tensor, lengths: torch.Tensor, targets: Sequence[Sequence[int]],
               blank: int) -> torch.Tensor:
    """CTC of (B, L, C) padded logits against each row's targets: the mean over clips of the loss per target
    unit; clips with more targets than outputs contribute zero (zero_infinity) instead of inf."""
    log_probs = nn.functional.log_softmax(logits, dim=-1)
    flat = torch.tensor([t for row in targets for t in row], dtype=torch.long)
    target_lengths = torch.tensor([len(row) for row in targets])
    return nn.functional.ctc_loss(log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=blank,
                                  reduction="mean", zero_infinity=True)


def unalignable_fraction(lengths: Sequence[int], targets: Sequence[Sequence[int]]) -> float:
    """The fraction of clips CTC cannot align, which the loss silently scores as zero: a path needs an
    output per target and a blank between each pair of equal neighbours ("ll" in "hello")."""
    needed = [len(row) + sum(a == b for a, b in zip(row, row[1:])) for row in targets]
    return sum(n > int(length) for n, length in zip(needed, lengths)) / max(len(needed), 1)


def training_readout(blsp: BlspModel, speech: torch.Tensor) -> torch.Tensor:
    """One clip's adapter outputs -> the vectors the LLM reads in training: the outputs themselves (the
    paper's readout), or the greedy CTC readout of a CTC-trained adapter, whose posteriors (a softmax at the
    config's readout temperature over the nearest word embeddings) pass gradients back to the adapter."""
    if not blsp.speech_length_varies:
        return speech
    table = blsp.llama_model.get_input_embeddings().weight
    return ctc_readout(speech, table, blsp.config.ctc_blank_id, blsp.config.ctc_readout_temperature)


def readout_prompts(batch: dict[str, Any], reads: Sequence[torch.Tensor], tokenizer, template: PromptTemplate,
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Each example's prompt and response rendered for the positions its clip was read into (`reads`), as
    serving lays a turn out: the token tensors of `collate_tokens`."""
    rows = []
    for instruction, response, read in zip(batch["instructions"], batch["responses"], reads):
        turns = [Turn("human", instruction=instruction, speech_tokens=read.shape[0]),
                 Turn("assistant", text=response)]
        rendered = render(turns, tokenizer, template, add_eos=True)
        rows.append({"input_ids": rendered.input_ids, "speech_mask": rendered.speech_mask, "labels": rendered.labels})
    return collate_tokens(rows, pad_id)


class AdapterObjective(nn.Module):
    """forward(batch) -> (loss, metrics). Holds the BlspModel as `blsp`, so accelerate can wrap the whole
    objective (DDP hooks then see every adapter gradient) and the encoder cache stays outside model.py.
    tokenizer: needed when the LLM's losses read speech through a CTC readout (prompts are laid out per batch)."""

    def __init__(self, blsp: BlspModel, loss: LossSection, cache: EncoderCache | None = None,
                 ctc_blank_id: int | None = None, masking: FrameMasking = FrameMasking(), tokenizer=None):
        super().__init__()
        self.blsp, self.loss, self.cache, self.ctc_blank_id = blsp, loss, cache, ctc_blank_id
        self.masking, self.tokenizer = masking, tokenizer
        if loss.ctc_weight and ctc_blank_id is None and blsp.ctc_head is None:
            raise ValueError("loss.ctc_weight is set but no CTC blank token id was given")
        if loss.needs_llm and blsp.speech_length_varies:
            if blsp.ctc_head is not None:
                raise ValueError("the LLM's losses cannot train a character head: the text it spells passes no "
                                 "gradient back to the adapter")
            if tokenizer is None:
                raise ValueError("the LLM's losses read speech through the CTC readout, and laying out each "
                                 "prompt after its clip is read needs the tokenizer")
            self.template, self.pad_id = template_for(blsp.config.prompt_template, tokenizer), pad_token_id(tokenizer)

    def train(self, mode: bool = True) -> "AdapterObjective":
        super().train(mode)
        self.blsp.train(mode)  # keeps Whisper and the LLM in eval mode
        return self

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        augment = self.masking if self.training and self.masking.active else None
        embeds = speech_embeddings(self.blsp, batch, self.cache, augment)
        loss, metrics = self._llm_losses(batch, embeds) if self.loss.needs_llm else (0.0, {})
        if self.loss.ctc_weight:
            loss = loss + self._ctc_losses(batch, embeds, metrics)
        return loss, metrics

    def _ctc_losses(self, batch: dict[str, Any], embeds: list[torch.Tensor], metrics: dict[str, float]) -> torch.Tensor:
        """The weighted CTC (over characters when the adapter has a character head, else over word pieces,
        with the commitment term); records them in `metrics`."""
        metrics["ctc_unalignable"] = unalignable_fraction([e.shape[0] for e in embeds], batch["transcript_ids"])
        if self.blsp.ctc_head is not None:
            ctc = character_ctc(embeds, batch["transcript_ids"], self.blsp.ctc_head)
            metrics["ctc"] = float(ctc.detach())
            return self.loss.ctc_weight * ctc
        table = self.blsp.llama_model.get_input_embeddings().weight
        ctc, commit = embedding_ctc(embeds, batch["transcript_ids"], table, self.ctc_blank_id)
        metrics.update(ctc=float(ctc.detach()), commit=float(commit.detach()))
        return self.loss.ctc_weight * ctc + self.loss.commit_weight * commit

    def _llm_losses(self, batch: dict[str, Any], embeds: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        reads, tokens = self._read(batch, embeds)
        keep = response_span(tokens["labels"])
        out = self.blsp(tokens["input_ids"], tokens["attention_mask"], tokens["speech_mask"], speech_embeds=reads,
                        logits_to_keep=keep)
        labels = tokens["labels"][:, -keep:]
        ce = cross_entropy(out.logits, labels)
        loss = self.loss.ce_weight * ce
        metrics = {"ce": float(ce.detach()), "response_tokens": float((labels != IGNORE_INDEX).sum())}
        if self.blsp.speech_length_varies:
            metrics.update(speech_positions=sum(r.shape[0] for r in reads) / max(len(reads), 1),
                           unheard_clips=float(sum(r.shape[0] == 0 for r in reads)))
        if self.loss.kd_weight:
            teacher = batch["teacher"]
            teacher_keep = response_span(teacher["labels"])
            with torch.no_grad():
                teacher_logits = self.blsp(teacher["input_ids"], teacher["attention_mask"],
                                           logits_to_keep=teacher_keep).logits
            kd = distillation_kl(out.logits, labels, teacher_logits, teacher["labels"][:, -teacher_keep:],
                                 self.loss.kd_temperature)
            loss = loss + self.loss.kd_weight * kd
            metrics["kd"] = float(kd.detach())
        return loss, metrics


    def _read(self, batch: dict[str, Any], embeds: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """What the LLM reads for each clip, and the batch's prompts laid out for it: the collator's own when
        every output fills a position, else rendered again for the lengths the CTC readout heard."""
        if not self.blsp.speech_length_varies:
            return embeds, batch
        reads = [training_readout(self.blsp, e) for e in embeds]
        tokens = readout_prompts(batch, reads, self.tokenizer, self.template, self.pad_id)
        return reads, {k: v.to(self.blsp.device) for k, v in tokens.items()}


def objective_loss(model: nn.Module, batch: dict[str, Any]):
    return model(batch)


def ctc_blank_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"loss.ctc_blank {text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
    return ids[0]
