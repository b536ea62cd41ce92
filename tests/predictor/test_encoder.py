"""The Flax port of all-MiniLM-L6-v2 equals transformers' PyTorch BertModel."""

import jax.numpy as jnp
import numpy as np
import pytest

from s3jax.predictor.encoder import backbone_dir, mean_pool, pretrained_encoder
from s3jax.predictor.tokenizer import PromptTokenizer

SENTENCES = [
  "Hello world, this is a test.",
  "How do I bake sourdough bread at home?",
  "",
  "Write a detailed essay on the causes of the fall of the Western Roman Empire, with sources.",
]


@pytest.mark.torch
def test_mean_pooled_embedding_matches_pytorch():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = PromptTokenizer(max_tokens=64)
  ids, mask = tok.pad(tok.encode(SENTENCES))
  enc = pretrained_encoder()
  ours = np.asarray(mean_pool(enc(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
  ref_model = transformers.BertModel.from_pretrained(str(backbone_dir()), add_pooling_layer=False).eval()
  with torch.no_grad():
    h = ref_model(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
    ).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    ref = ((h * m).sum(1) / m.sum(1)).numpy()
  assert ours.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # Our tokenizer gives the package tokenizer's ids ([CLS] ... [SEP]).
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(backbone_dir()))
  assert list(ids[0, : mask[0].sum()]) == hf_tok(SENTENCES[0])["input_ids"]
