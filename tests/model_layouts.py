"""Parameter lists of real models, as (name, shape) in Keras's order, for placement tests."""


def resnet50() -> dict[str, tuple[int, ...]]:
    """Keras `applications.ResNet50` (include_top): every trainable tensor, 25.6 M parameters."""
    shapes = {"conv1_conv/kernel": (7, 7, 3, 64), "conv1_conv/bias": (64,), "conv1_bn/gamma": (64,),
              "conv1_bn/beta": (64,)}
    channels = 64
    for stage, (filters, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=2):
        for block in range(1, blocks + 1):
            prefix = f"conv{stage}_block{block}"
            convs = [("1", (1, 1, channels, filters)), ("2", (3, 3, filters, filters)),
                     ("3", (1, 1, filters, 4 * filters))]
            if block == 1:
                convs.insert(0, ("0", (1, 1, channels, 4 * filters)))
            for index, kernel in convs:
                shapes[f"{prefix}_{index}_conv/kernel"] = kernel
                shapes[f"{prefix}_{index}_conv/bias"] = (kernel[-1],)
                shapes[f"{prefix}_{index}_bn/gamma"] = (kernel[-1],)
                shapes[f"{prefix}_{index}_bn/beta"] = (kernel[-1],)
            channels = 4 * filters
    shapes["predictions/kernel"] = (2048, 1000)
    shapes["predictions/bias"] = (1000,)
    return shapes


def bert_base() -> dict[str, tuple[int, ...]]:
    """BERT-base uncased (12 layers, hidden 768, vocabulary 30522), with the pooler: 109 M parameters."""
    hidden, inner = 768, 3072
    shapes = {"embeddings/word": (30522, hidden), "embeddings/position": (512, hidden),
              "embeddings/token_type": (2, hidden), "embeddings/norm/gamma": (hidden,),
              "embeddings/norm/beta": (hidden,)}
    for layer in range(12):
        prefix = f"encoder/layer_{layer}"
        for part in ("query", "key", "value", "attention_output"):
            shapes[f"{prefix}/{part}/kernel"] = (hidden, hidden)
            shapes[f"{prefix}/{part}/bias"] = (hidden,)
        shapes[f"{prefix}/attention_norm/gamma"] = (hidden,)
        shapes[f"{prefix}/attention_norm/beta"] = (hidden,)
        shapes[f"{prefix}/intermediate/kernel"] = (hidden, inner)
        shapes[f"{prefix}/intermediate/bias"] = (inner,)
        shapes[f"{prefix}/output/kernel"] = (inner, hidden)
        shapes[f"{prefix}/output/bias"] = (hidden,)
        shapes[f"{prefix}/output_norm/gamma"] = (hidden,)
        shapes[f"{prefix}/output_norm/beta"] = (hidden,)
    shapes["pooler/kernel"] = (hidden, hidden)
    shapes["pooler/bias"] = (hidden,)
    return shapes


def embedding_and_dense() -> dict[str, tuple[int, ...]]:
    """One large embedding table (1 M rows of 64) and the small dense layers of a recommender on top."""
    return {"embedding": (1_000_000, 64), "dense_1/kernel": (128, 256), "dense_1/bias": (256,),
            "dense_2/kernel": (256, 64), "dense_2/bias": (64,), "output/kernel": (64, 1), "output/bias": (1,)}
