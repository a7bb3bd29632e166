"""The Keras side of tools/pipelines.py, run by a Python that has tensorflow and tf2onnx (the `pipelines` extra;
kept out of the project's own environment): a Keras CNN conv1 -> Dropout drop1 -> BatchNormalization bn1 -> ReLU
-> conv2 -> Dropout drop2 -> bn2 -> ReLU -> pool -> Dense, its BN statistics set by training-mode passes with
dropout on (Keras's moving averages, momentum 0.9), exported with tf2onnx (which folds each BN into its conv),
and Keras's own reference for the fix: the relative rule (DESIGN 5.6) done in Keras, BN by BN in order, with
the dropout-on moments of the original network and the dropout-off moments after the BNs before are corrected.

    python tools/pipelines_keras.py IN.npz OUT_FOLDER     # IN: x_calib, x_test (NHWC float32)
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

RATE = 0.5


def build():
    tf.keras.utils.set_random_seed(0)  # weights, dropout masks: the table reproduces
    inp = tf.keras.Input((32, 32, 3), name="image")
    x = inp
    for k, width in ((1, 16), (2, 32)):
        x = tf.keras.layers.Conv2D(width, 3, padding="same", strides=k, use_bias=False, name=f"conv{k}")(x)
        x = tf.keras.layers.Dropout(RATE, name=f"drop{k}")(x)
        x = tf.keras.layers.BatchNormalization(momentum=0.9, name=f"bn{k}")(x)
        x = tf.keras.layers.ReLU(name=f"relu{k}")(x)
    x = tf.keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return tf.keras.Model(inp, tf.keras.layers.Dense(10, name="fc")(x))


def forward(model, x, dropout: bool, upto: str | None = None):
    """Layer by layer: Dropout in training mode when ``dropout``, BN always on its moving statistics; the
    input of layer ``upto`` when given."""
    h = x
    for layer in model.layers[1:]:
        if layer.name == upto:
            return h
        h = layer(h, training=dropout) if isinstance(layer, tf.keras.layers.Dropout) else layer(h, training=False)
    return h


def moments(h):
    h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
    return h.mean(0), h.var(0)


def main(inp: str, out: str) -> None:
    data = np.load(inp)
    x_calib, x_test = data["x_calib"], data["x_test"]
    model = build()
    for _ in range(3):  # statistics-setting run: training-mode passes with dropout on
        for i in range(0, len(x_calib), 128):
            model(x_calib[i:i + 128], training=True)
    original = model.predict(x_test, verbose=0)
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    import onnx

    onnx.save(onnx_model, os.path.join(out, "keras.onnx"))
    bns = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    on = {bn.name: moments(forward(model, x_calib, True, bn.name)) for bn in bns}  # original network
    for bn in bns:  # in order: the BNs before are corrected when the dropout-off moments are measured
        m_on, v_on = on[bn.name]
        m_off, v_off = moments(forward(model, x_calib, False, bn.name))
        mu_s, v_s = (np.asarray(w, np.float64) for w in (bn.moving_mean, bn.moving_variance))
        scale = np.sqrt(v_on / v_off)
        eps = bn.epsilon
        bn.moving_variance.assign(((v_s + eps) / scale ** 2 - eps).astype(np.float32))
        bn.moving_mean.assign((m_off - (m_on - mu_s) / scale).astype(np.float32))
    reference = model.predict(x_test, verbose=0)
    np.savez(os.path.join(out, "keras_reference.npz"), original=original, reference=reference,
             versions=np.array([tf.__version__, tf2onnx.__version__]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
