"""A BERT/RoBERTa layer stack run as a decoder that reads the encoder through its own
self-attention ("prefix" attention, as in UniLM's sequence-to-sequence fine-tuning).

Why: turning an encoder-only checkpoint into a decoder the usual way adds cross-attention
layers that start random (a third of every decoder layer's attention weights). With the small
training sets of relation extraction those weights learn slowly, and the decoder cannot read
the sentence until they have. Here each decoder layer ``l`` attends, with its own pretrained
query/key/value projections, to the concatenation of

- the shared encoder's input to layer ``l`` (``hidden_states[l]``) for every source token
  (padding masked), and
- the decoder's own earlier target positions (causal),

which is exactly what the pretrained layer computes when the target is appended to the source
and seen through a sequence-to-sequence mask. At initialisation (decoder layers copied from the
encoder) no weight is random, so the decoder starts as a pretrained contextual model.

Target tokens use token type 1 where the checkpoint has two types (the segment of a second
sentence, which tells target positions from source positions that hold the same word), and
positions from the first position on, like the encoder's.

The key/value cache of generation (:class:`PrefixCache`) keeps each layer's source keys and
values, computed once, and the target keys and values written so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrefixCache:
    """Per layer: source keys and values [B,heads,S,d] and target keys and values [B,heads,T,d]."""

    def __init__(self) -> None:
        self.layers: list[list[torch.Tensor]] = []

    def get_seq_length(self) -> int:
        """Target positions already in the cache."""
        return self.layers[0][2].shape[2] if self.layers else 0

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search reorders its rows after every step)."""
        self.layers = [[t.index_select(0, index) for t in layer] for layer in self.layers]


class PrefixDecoder(nn.Module):
    """Decoder over the layers, embeddings and config of a BERT-like ``model`` (its weights are kept)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config = model.config
        self.n_heads = int(config.num_attention_heads)
        self.token_type = min(1, int(config.type_vocab_size) - 1)
        # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
        self.first_position = int(config.pad_token_id) + 1 if config.model_type == "roberta" else 0

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        return x.view(b, t, self.n_heads, h // self.n_heads).transpose(1, 2)

    def _embed(self, inputs_embeds: torch.Tensor, start: int) -> torch.Tensor:
        emb = self.model.embeddings
        n, device = inputs_embeds.shape[1], inputs_embeds.device
        positions = torch.arange(start, start + n, device=device) + self.first_position
        types = torch.full(inputs_embeds.shape[:2], self.token_type, dtype=torch.long, device=device)
        x = inputs_embeds + emb.token_type_embeddings(types) + emb.position_embeddings(positions)
        return emb.dropout(emb.LayerNorm(x))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: PrefixCache | None = None,
    ) -> torch.Tensor:
        """Hidden states [B,T,H] of the target tokens, given their embeddings [B,T,H].

        memory [B,L+1,S,H]: the encoder's hidden states (embedding output, then each layer's
        output), so ``memory[:, l]`` is the input of encoder layer ``l``; memory_mask [B,S].
        With ``cache``, the embeddings are of the new positions only and the cache is extended.
        """
        start = cache.get_seq_length() if cache is not None else 0
        x = self._embed(inputs_embeds, start)
        n_new = inputs_embeds.shape[1]
        n_all = start + n_new
        causal = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(start)
        source = memory_mask.bool()[:, None, None, :].expand(-1, 1, n_new, -1)
        mask = torch.cat([source, causal.expand(x.shape[0], 1, n_new, n_all)], dim=-1)
        fill_cache = cache is not None and not cache.layers
        for i, layer in enumerate(self.layers):
            attn = layer.attention.self
            q, k_new, v_new = (self._heads(proj(x)) for proj in (attn.query, attn.key, attn.value))
            if cache is None or fill_cache:
                k_src, v_src = self._heads(attn.key(memory[:, i])), self._heads(attn.value(memory[:, i]))
                k_tgt, v_tgt = k_new, v_new
                if fill_cache:
                    cache.layers.append([k_src, v_src, k_tgt, v_tgt])
            else:
                entry = cache.layers[i]
                k_src, v_src = entry[0], entry[1]
                k_tgt = entry[2] = torch.cat([entry[2], k_new], dim=2)
                v_tgt = entry[3] = torch.cat([entry[3], v_new], dim=2)
            out = F.scaled_dot_product_attention(
                q,
                torch.cat([k_src, k_tgt], dim=2),
                torch.cat([v_src, v_tgt], dim=2),
                attn_mask=mask,
                dropout_p=attn.dropout.p if self.training else 0.0,
            )
            out = out.transpose(1, 2).flatten(2)
            x = layer.attention.output(out, x)
            x = layer.output(layer.intermediate(x), x)
        return x
