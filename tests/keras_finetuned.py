"""Fine-tuned Keras models of the shapes users write, built, trained and saved by real Keras.

Each builder takes the Keras module (Keras 3's ``keras`` or ``tf_keras``) and returns a model.
``make`` then moves every weight off its initial value (biases are zero at initialisation, so a
loader that dropped them would pass otherwise), trains it for two steps so the
BatchNormalization statistics move too and the file carries an optimizer, and saves it.
Small inputs (48x48, 64x64, 40x56) keep a VGG16/VGG19 base quick.
"""

from __future__ import annotations

import numpy as np

HW = (48, 48)


def _base(keras, depth=16, input_shape=(48, 48, 3)):
    build = keras.applications.VGG16 if depth == 16 else keras.applications.VGG19
    return build(weights=None, include_top=False, input_shape=input_shape)


def gap_head(keras):
    """The issue's first shape: Sequential([base, GAP, Dense relu, Dense softmax])."""
    layers = keras.layers
    return keras.Sequential(
        [_base(keras), layers.GlobalAveragePooling2D(), layers.Dense(24, activation="relu"), layers.Dense(5, activation="softmax")]
    )


def bn_head(keras):
    """Flatten -> Dense -> BatchNormalization -> Dropout -> Dense(sigmoid): a binary classifier."""
    layers = keras.layers
    return keras.Sequential(
        [
            _base(keras),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.BatchNormalization(),
            layers.Dropout(0.5),
            layers.Dense(1, activation="sigmoid"),
        ]
    )


def cut_block2(keras):
    """The base cut at block2_pool and extended with a 'valid' conv (Functional, flat)."""
    layers = keras.layers
    base = _base(keras, input_shape=(64, 64, 3))
    x = base.get_layer("block2_pool").output
    x = layers.Conv2D(16, (3, 3), activation="relu")(x)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    out = layers.Dense(10, activation="softmax")(x)
    return keras.Model(base.input, out)


def surgery(keras):
    """VGG's layers taken apart and put together again, block3_conv3 replaced by a 1x1 conv."""
    layers = keras.layers
    base = _base(keras)
    inputs = keras.Input((48, 48, 3))
    x = inputs
    for layer in base.layers[1:]:
        if layer.name == "block3_conv3":
            x = layers.Conv2D(256, (1, 1), activation="elu", name="block3_conv3_1x1")(x)
        else:
            x = layer(x)
    x = layers.GlobalMaxPooling2D()(x)
    out = layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, out)


def rescaling_nested(keras):
    """Rescaling in front of a base called as a layer of a Functional model, sigmoid head."""
    layers = keras.layers
    base = _base(keras)
    inputs = keras.Input((48, 48, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = base(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, out)


def vgg19_other_size(keras):
    """A VGG19 base at 40x56 under Flatten + Dense softmax."""
    layers = keras.layers
    return keras.Sequential([_base(keras, 19, (40, 56, 3)), layers.Flatten(), layers.Dense(6, activation="softmax")])


def every_op(keras):
    """A head that uses every op fastvgg adds, on a base cut at block3_pool (odd sizes on purpose)."""
    layers = keras.layers
    base = _base(keras, input_shape=(56, 40, 3))
    x = base.get_layer("block3_pool").output  # 7x5
    x = layers.Conv2D(32, (1, 1), use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("gelu")(x)
    # Conv2D -> BatchNormalization -> ReLU: the executor folds the normalization into a
    # Winograd convolution (32 input channels) and fuses the ReLU into its kernel.
    x = layers.Conv2D(24, (3, 3), padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.AveragePooling2D((2, 2), padding="same")(x)  # 4x3, the edge windows hang over
    x = layers.SpatialDropout2D(0.2)(x)
    x = layers.Conv2D(16, (3, 3), padding="same", activation="swish")(x)
    x = layers.GaussianNoise(0.3)(x)
    x = layers.MaxPooling2D((2, 2), padding="same")(x)  # 2x2
    x = layers.AveragePooling2D((2, 2))(x)  # 1x1
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(12, activation="tanh")(x)
    x = layers.Dense(12, activation="selu")(x)
    x = layers.BatchNormalization(center=False)(x)
    x = layers.Dense(12, activation="softplus")(x)
    x = layers.ReLU()(x)
    x = layers.Dense(12, activation="elu")(x)
    x = layers.Dense(6, activation="sigmoid")(x)
    x = layers.Dense(4)(x)
    out = layers.Softmax()(x)
    return keras.Model(base.input, out)


def leaky_relu_head(keras):
    """LeakyReLU in each of Keras's spellings, on images and on flat rows: the LeakyReLU layer
    (default slope 0.3 and an explicit one: negative_slope in Keras 3, alpha in tf.keras),
    ReLU(negative_slope=...), and Keras 3's activation="leaky_relu" (slope 0.2) on a
    convolution and a dense layer (tf.keras has no such activation: a LeakyReLU layer there)."""
    layers = keras.layers
    keras3 = hasattr(keras.activations, "leaky_relu")
    slope_name = "negative_slope" if keras3 else "alpha"

    def conv_or_dense(layer, x):
        return layer(activation="leaky_relu")(x) if keras3 else layers.LeakyReLU(**{slope_name: 0.2})(layer()(x))

    base = _base(keras)
    x = base.get_layer("block4_pool").output  # 3x3x512
    x = layers.Conv2D(32, (3, 3), padding="same")(x)
    x = layers.LeakyReLU()(x)
    x = conv_or_dense(lambda **kw: layers.Conv2D(24, (1, 1), **kw), x)
    x = layers.Conv2D(16, (3, 3), padding="same")(x)
    x = layers.ReLU(negative_slope=0.1)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = conv_or_dense(lambda **kw: layers.Dense(16, **kw), x)
    x = layers.Dense(12)(x)
    x = layers.LeakyReLU(**{slope_name: 0.05})(x)
    out = layers.Dense(5, activation="softmax")(x)
    return keras.Model(base.input, out)


def clipped_relu_head(keras):
    """Keras's capped and shifted ReLUs, on images and on flat rows: ReLU(max_value=6) (Keras's
    relu6), ReLU with a threshold and a slope, ReLU with all three numbers, and Keras 3's
    activation="relu6" on a convolution and a dense layer (tf.keras has no such activation: a
    ReLU(max_value=6) layer there); tf.keras's ThresholdedReLU, and the ELU layer. The Rescaling
    brings the features to the range where the cap of 6 bites; the thresholds and caps sit inside
    the ranges of the values they see."""
    layers = keras.layers
    keras3 = hasattr(keras.activations, "relu6")

    def relu6_on(layer, x):
        return layer(activation="relu6")(x) if keras3 else layers.ReLU(max_value=6.0)(layer()(x))

    base = _base(keras)
    x = base.get_layer("block2_pool").output  # 12x12x128
    x = layers.Conv2D(32, (3, 3), padding="same")(x)
    x = layers.Rescaling(25.0)(x)
    x = layers.ReLU(max_value=6.0)(x)
    x = relu6_on(lambda **kw: layers.Conv2D(24, (1, 1), **kw), x)
    x = layers.ReLU(negative_slope=0.2, threshold=0.5)(x)
    if not keras3:  # Keras 3 dropped it
        x = layers.ThresholdedReLU(theta=0.3)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = relu6_on(lambda **kw: layers.Dense(16, **kw), x)
    x = layers.Dense(14)(x)
    x = layers.ELU()(x)
    x = layers.Dense(12)(x)
    x = layers.ReLU(max_value=0.8, negative_slope=0.1, threshold=0.05)(x)
    out = layers.Dense(5, activation="softmax")(x)
    return keras.Model(base.input, out)


def prelu_head(keras):
    """PReLU as users swap it in for ReLU: one alpha per channel of an image (shared_axes=[1, 2]),
    one per pixel and channel (Keras's default, which fixes the input size), one per row and
    channel (shared_axes=[2]), one per pixel shared by the channels (shared_axes=[3]), and one
    per feature of a dense layer. Alphas start at 0.25 (Keras's default of 0 would be a ReLU until
    trained)."""
    layers = keras.layers
    alpha = keras.initializers.Constant(0.25)
    base = _base(keras)
    x = base.get_layer("block3_pool").output  # 6x6x256
    x = layers.Conv2D(32, (3, 3), padding="same")(x)
    x = layers.PReLU(alpha_initializer=alpha, shared_axes=[1, 2])(x)
    x = layers.Conv2D(24, (1, 1))(x)
    x = layers.PReLU(alpha_initializer=alpha)(x)
    x = layers.Conv2D(16, (3, 3), padding="same")(x)
    x = layers.PReLU(alpha_initializer=alpha, shared_axes=[2])(x)
    x = layers.PReLU(alpha_initializer=alpha, shared_axes=[3])(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(12)(x)
    x = layers.PReLU(alpha_initializer=alpha)(x)
    out = layers.Dense(5, activation="softmax")(x)
    return keras.Model(base.input, out)


def activations_head(keras):
    """Activations by name beyond the ReLU family, on convolutions, on an image and on dense
    layers: mish, softsign, the hard sigmoid (tf.keras's, clip(0.2 x + 0.5, 0, 1), is another
    function than Keras 3's relu6(x + 3) / 6), Keras 3's hard_silu (tf.keras has none: its hard
    sigmoid again) and exponential. The Rescaling spreads the softsign's (-1, 1) over both
    clipped ends of the hard sigmoid."""
    layers = keras.layers
    keras3 = hasattr(keras.activations, "hard_silu")
    base = _base(keras)
    x = base.get_layer("block3_pool").output  # 6x6x256
    x = layers.Conv2D(16, (3, 3), padding="same", activation="mish")(x)
    x = layers.Conv2D(16, (1, 1), activation="softsign")(x)
    x = layers.Rescaling(5.0)(x)
    x = layers.Activation("hard_sigmoid")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(12, activation="hard_silu" if keras3 else "hard_sigmoid")(x)
    x = layers.Dense(8, activation="exponential")(x)
    out = layers.Dense(5, activation="softmax")(x)
    return keras.Model(base.input, out)


def dense_on_image(keras):
    """Dense layers on images (no Flatten before them: Keras applies them to every pixel), one on
    a 1x1 image, then Flatten and a softmax Dense, on a VGG16 base at 32x32."""
    layers = keras.layers
    base = _base(keras, input_shape=(32, 32, 3))
    x = base.get_layer("block3_pool").output  # 4x4x256
    x = layers.Dense(32, activation="relu")(x)
    x = layers.MaxPooling2D((2, 2))(x)  # 2x2
    x = layers.Dense(16)(x)
    x = layers.MaxPooling2D((2, 2))(x)  # 1x1
    x = layers.Dense(8, activation="tanh")(x)
    x = layers.Flatten()(x)
    out = layers.Dense(3, activation="softmax")(x)
    return keras.Model(base.input, out)


def preprocess_inside(keras):
    """keras.applications.vgg16.preprocess_input called inside the model, after an augmentation
    layer (the identity at inference), before a VGG16 base: Keras 3 records it as GetItem and
    Stack ops and an Add of the means, tf.keras as a slice and tf.nn.bias_add (.h5 only: tf.keras
    cannot write these ops to .keras)."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.RandomFlip("horizontal")(inputs)
    x = keras.applications.vgg16.preprocess_input(x)
    # A nested base cut at block3_pool: features that still tell the images apart, so the
    # head's outputs spread without amplifying float32 rounding (see _spread_outputs).
    base = _base(keras, input_shape=(32, 32, 3))
    x = keras.Model(base.input, base.get_layer("block3_pool").output, name="vgg16_cut")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, out)


def normalization_front(keras):
    """A Normalization layer adapted to data in front of a small conv net with no VGG at all."""
    layers = keras.layers
    norm = layers.Normalization(axis=-1)
    norm.adapt(np.random.default_rng(0).uniform(0, 255, (16, 20, 20, 3)).astype("float32"))
    return keras.Sequential(
        [
            keras.Input((20, 20, 3)),
            norm,
            layers.Conv2D(8, (3, 3), activation="relu"),
            layers.AveragePooling2D((2, 2)),
            layers.Conv2D(8, (1, 1), activation="sigmoid"),
            layers.Flatten(),
            layers.Dense(3, activation="softmax"),
        ]
    )


def caffe_padded(keras):
    """VGG written out as early Keras ports of Caffe's model did: every 3x3 convolution 'valid'
    after a ZeroPadding2D of one pixel (in each of Keras's spellings), at an odd size."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((30, 26, 3)),
            layers.ZeroPadding2D((1, 1)),
            layers.Conv2D(16, (3, 3), activation="relu", name="conv1"),
            layers.ZeroPadding2D(1),
            layers.Conv2D(16, (3, 3), activation="relu", name="conv2"),
            layers.MaxPooling2D((2, 2)),
            layers.ZeroPadding2D(((1, 1), (1, 1))),
            layers.Conv2D(32, (3, 3), activation="relu", name="conv3"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(5, activation="softmax"),
        ]
    )


BUILDERS = {
    "gap_head": gap_head,
    "bn_head": bn_head,
    "cut_block2": cut_block2,
    "surgery": surgery,
    "rescaling_nested": rescaling_nested,
    "vgg19_other_size": vgg19_other_size,
    "every_op": every_op,
    "leaky_relu_head": leaky_relu_head,
    "clipped_relu_head": clipped_relu_head,
    "prelu_head": prelu_head,
    "activations_head": activations_head,
    "dense_on_image": dense_on_image,
    "preprocess_inside": preprocess_inside,
    "caffe_padded": caffe_padded,
    "normalization_front": normalization_front,
}


def input_range(name):
    """(low, high) of the test images: 0..255 where the model scales its input itself, else
    values of about unit size, so that the random-weight heads give outputs away from 0 and 1
    (a saturated softmax would hide errors)."""
    return (0.0, 255.0) if name in ("rescaling_nested", "normalization_front", "preprocess_inside") else (-2.0, 2.0)


def _leaf_layers(model):
    for layer in model.layers:
        if layer.__class__.__name__ in ("Sequential", "Functional", "Model"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def perturb_weights(model, rng):
    """Every weight moved off its initial value by a few percent of its layer's scale."""
    for layer in _leaf_layers(model):
        # Keras 3's Normalization computes from its adapted statistics once (finalize_state) and
        # ignores later set_weights until the model is reloaded: leave it as adapted.
        if layer.__class__.__name__ == "Normalization":
            continue
        moved = []
        for w in layer.get_weights():
            scale = 0.05 * (np.abs(w).mean() + 0.1) if w.ndim > 0 else 0.0
            moved.append((w + rng.normal(0, 1, w.shape) * scale).astype(w.dtype))
        layer.set_weights(moved)


def perturb_and_train(keras, model, seed, low=-2.0, high=2.0):
    """Every weight off its initial value, then two training steps (which move the
    BatchNormalization statistics and give the file an optimizer state)."""
    rng = np.random.default_rng(seed)
    perturb_weights(model, rng)
    shape = (4,) + tuple(model.input_shape[1:])
    x = rng.uniform(low, high, shape).astype("float32")
    y = model.predict(x, verbose=0)
    target = rng.uniform(0, 1, y.shape).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3), loss="mse")
    model.fit(x, target, batch_size=2, epochs=1, verbose=0)
    _spread_outputs(model, x)
    return model


def _spread_outputs(model, x):
    """Random VGG activations shrink or blow up at these sizes, so a head's softmax or sigmoid
    ends up uniform or saturated, and a 1e-4 check of it says little. This rescales the last
    Dense layer (as training would) so that its logits are centred with a spread of about 2 on
    these images; the gain is capped, since amplifying a difference the features barely carry
    would only measure float32 rounding."""
    last = [layer for layer in _leaf_layers(model) if layer.__class__.__name__ == "Dense"][-1]
    kernel, bias = last.get_weights()
    p = np.clip(np.asarray(model.predict(x, verbose=0), dtype=np.float64), 1e-12, 1 - 1e-12)
    logits = np.log(p / (1 - p)) if p.shape[-1] == 1 else np.log(p)
    contribution = logits - bias  # x . W, up to a per-row constant under softmax
    if p.shape[-1] > 1:
        contribution -= contribution.mean(axis=1, keepdims=True)
    mean = contribution.mean(axis=0)
    gain = min(2.0 / max(float((contribution - mean).std()), 1e-12), 50.0)
    last.set_weights([(kernel * gain).astype(kernel.dtype), (-gain * mean).astype(bias.dtype)])
