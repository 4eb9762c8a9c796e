"""On a real model and real tokens, a few optimisation steps move every connector kind away from the identity."""

import numpy as np
import pytest
from fixtures_models import make_checkpoint
from fixtures_tokenizer import corpus, make_chatml_tokenizer

import tx
from tx.adapters.connector import connector_layer
from tx.train.data import Dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("learns")
    make_chatml_tokenizer(root / "tok")
    tok = tx.load_tokenizer(root / "tok")
    folder, _ = make_checkpoint("llama", root / "ckpt", vocab_size=tok.vocab_size)
    records = [{"text": t} for t in corpus(64, seed=0)]
    data = Dataset(records, tok, seq_len=48, batch_size=4, seed=0, vocab_size=tok.vocab_size)
    return folder, data


@pytest.mark.parametrize("kind", ["static", "dynamic", "mhc"])
def test_training_moves_the_connector(setup, kind):
    folder, data = setup
    model = tx.load_model(folder)
    tx.attach(model, connector=tx.ConnectorConfig(expansion_rate=4, kind=kind))  # connector alone: it must learn
    trainer = tx.Trainer(
        model, tx.TrainConfig(steps=6, lr=5e-3, schedule="constant", batch_size=4, seq_len=48, progress=False)
    )
    x = model.streams.expand(model.embed(data.batch(0)["input_ids"]))  # layer 0's input streams
    pre0, post0, res0 = connector_layer(model.layers.attn_residual, 0).coefficients(x)
    np.testing.assert_array_equal(np.asarray(res0), np.broadcast_to(np.eye(4), res0.shape))  # exactly I at init
    np.testing.assert_array_equal(np.asarray(post0), 1.0)
    losses = [float(trainer.step(data.batch(i))["loss"]) for i in range(6)]
    pre, post, res = connector_layer(model.layers.attn_residual, 0).coefficients(x)
    post, res = np.asarray(post), np.asarray(res)
    # streams become different: output stream j gets H_post[j] * y, and the H_post entries now differ per stream
    assert np.ptp(post, axis=-1).max() > 1e-4, np.ptp(post, axis=-1).max()  # exactly 0 at init
    assert np.abs(res - np.eye(4)).max() > 1e-4  # H_res left I
    assert losses[-1] != losses[0]
    if kind == "mhc":  # still doubly stochastic after training
        np.testing.assert_allclose(res.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(res.sum(-2), 1.0, atol=1e-5)
        assert (np.asarray(pre) > 0).all() and (np.asarray(pre) < 1).all()
        assert (post > 0).all() and (post < 2).all()
