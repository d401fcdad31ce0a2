"""The README's Spark and Dask recipes ("Scaling out"), run for real on a local cluster.

Each test runs its recipe as the README writes it, changed only where a test must be fast
and offline: a random-weights Keras HDF5 file instead of "imagenet", 64x64 images instead of
224x224, local files, and a cluster of this machine's size (Spark ``local[2]``; a Dask
``LocalCluster`` of two worker processes with one fastvgg thread each). The features must
equal a plain ``model.predict`` on the same images bit for bit (the model gives each image
the same output whatever the batch and the thread count), every row must come back once, no
worker process may build the model twice (a wrapper around the recipe's model builder
writes down each build), and each model must run on the threads the recipe gives it.

The recipe functions are defined inside the tests, not at module level: Spark and Dask
pickle closures by value, but module functions by reference, and the workers cannot import
this test module. Each test skips with the reason where its library is missing (Dask is in
the test extra; pyspark is not: ``pip install "fastvgg[spark]"`` and a Java 17+ runtime)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

import fastvgg
import helpers

PIL = pytest.importorskip("PIL.Image", reason="the recipe tests decode images with Pillow")

SIZE = 64  # the README says 224; any size from 32 up works without the top


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return helpers.random_vgg16_notop_h5(tmp_path_factory.mktemp("weights"), seed=5)


@pytest.fixture(autouse=True)
def time_limit():
    """A stuck cluster fails the test after 120 s instead of hanging the suite."""
    with helpers.time_limit(120, "the recipe"):
        yield


def counted(make_predict_fn, log):
    """``make_predict_fn`` that writes its process id and the threads fastvgg will use to
    ``log``: Spark calls it each time a worker process builds the model."""

    def make_counted():
        predict = make_predict_fn()
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {fastvgg.get_num_threads()}\n")
        return predict

    return make_counted


def loads(log) -> list:
    """(process id, threads) of each model built, as the wrappers below write them."""
    with open(log) as f:
        return [tuple(int(field) for field in line.split()) for line in f]


# Dask -------------------------------------------------------------------------------------
def test_dask_recipe_gives_model_predict_s_features_bit_for_bit(weights_file, tmp_path):
    pytest.importorskip("dask.bag", reason='the Dask recipe needs Dask: pip install "fastvgg[dask]"')
    pytest.importorskip("dask.distributed", reason='the Dask recipe needs distributed: pip install "fastvgg[dask]"')
    import dask.bag as db
    from dask.distributed import Client, LocalCluster, WorkerPlugin, get_worker

    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(80, 70), (64, 64), (50, 90), (120, 100)] * 3):  # resized by load_img
        paths.append(str(tmp_path / f"img{i:02d}.png"))
        PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    log = str(tmp_path / "model-loads")

    # The README's recipe: -------------------------------------------------------------
    class VGGFeatures(WorkerPlugin):  # builds the model once in each worker process
        def setup(self, worker):
            import fastvgg

            worker.vgg = fastvgg.VGG16(weights_file, include_top=False, pooling="avg")

    def partition_features(paths):
        import fastvgg
        from fastvgg.image import img_to_array, load_img

        x = np.stack([img_to_array(load_img(p, target_size=(SIZE, SIZE))) for p in paths])
        features = get_worker().vgg.predict(fastvgg.preprocess_input(x))
        return [dict(path=p, features=f) for p, f in zip(paths, features)]
    # ------------------------------------------------------------------------------------

    class CountedVGGFeatures(VGGFeatures):
        def setup(self, worker):
            super().setup(worker)
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {fastvgg.get_num_threads()}\n")

    # The README's cluster, at this machine's size: one task thread per worker process and
    # FASTVGG_NUM_THREADS the cores each worker may use. No dashboard: its port may be taken,
    # and the warning that says so would fail the test.
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      env={"FASTVGG_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
        client.register_plugin(CountedVGGFeatures())
        bag = db.from_sequence(paths, partition_size=2).map_partitions(partition_features)
        assert bag.npartitions == 6  # more partitions than workers: each worker reuses its model
        rows = bag.compute()

    assert [row["path"] for row in rows] == paths  # every row once, in order
    built = loads(log)
    pids = [pid for pid, _ in built]
    assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids  # once per worker
    assert [threads for _, threads in built] == [1, 1]  # FASTVGG_NUM_THREADS reached the workers

    from fastvgg.image import img_to_array, load_img

    x = np.stack([img_to_array(load_img(p, target_size=(SIZE, SIZE))) for p in paths])
    expected = fastvgg.VGG16(weights_file, include_top=False, pooling="avg").predict(fastvgg.preprocess_input(x))
    got = np.stack([row["features"] for row in rows])
    assert got.shape == expected.shape == (len(paths), 512) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


# Spark ------------------------------------------------------------------------------------
def stop_jvm():
    """Ends the JVM that pyspark started: ``spark.stop()`` leaves it running (a few hundred MB)
    until this process exits, which would be the end of the whole test run."""
    from pyspark import SparkContext

    gateway, SparkContext._gateway, SparkContext._jvm = SparkContext._gateway, None, None
    if gateway is None:
        return
    gateway.shutdown()
    proc = getattr(gateway, "proc", None)
    if proc is not None:
        proc.stdin.close()  # the JVM exits when its stdin closes
        proc.wait(timeout=30)


@pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_recipe_gives_model_predict_s_features_bit_for_bit(weights_file, tmp_path, monkeypatch):
    pytest.importorskip("pyspark", reason='the Spark recipe needs pyspark: pip install "fastvgg[spark]"')
    pytest.importorskip("pandas", reason='predict_batch_udf needs pandas: pip install "fastvgg[spark]"')
    pytest.importorskip("pyarrow", reason='predict_batch_udf needs pyarrow: pip install "fastvgg[spark]"')
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        pytest.skip("the Spark recipe needs a Java runtime (java on PATH or JAVA_HOME)")
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType

    # Spark starts its Python workers with $PYSPARK_PYTHON, else whatever "python3" is on
    # PATH, which need not be the interpreter (and the fastvgg) under test.
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    log = str(tmp_path / "model-loads")
    images = np.random.default_rng(8).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)

    # The README's recipe: -------------------------------------------------------------
    def make_vgg_features():
        import fastvgg
        from pyspark import TaskContext

        fastvgg.set_num_threads(TaskContext.get().cpus())  # spark.task.cpus
        model = fastvgg.VGG16(weights_file, include_top=False, pooling="avg")
        return lambda pixels: model.predict(fastvgg.preprocess_input(pixels))  # (batch, SIZE, SIZE, 3) -> (batch, 512)

    vgg_features = predict_batch_udf(counted(make_vgg_features, log), return_type=ArrayType(FloatType()),
                                     batch_size=2, input_tensor_shapes=[[SIZE, SIZE, 3]])
    # ------------------------------------------------------------------------------------

    # The JVM options only start it faster (about 4 s of 20 on 2 cores): no C2 compiler.
    spark = (SparkSession.builder.master("local[2]").appName("fastvgg recipe test")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
             .getOrCreate())
    try:
        spark.sparkContext.setLogLevel("ERROR")
        # A column of flattened 0..255 RGB pixel arrays, in 4 partitions of 3 rows for 2 task
        # slots: each Python worker runs several tasks and must reuse its model, and each
        # partition goes to predict in batches of 2 and 1.
        rows = [(i, images[i].ravel().tolist()) for i in range(len(images))]
        df = spark.createDataFrame(spark.sparkContext.parallelize(rows, 4), "id int, pixels array<int>")
        df = df.withColumn("features", vgg_features("pixels"))
        out = sorted(df.select("id", "features").collect())
    finally:
        spark.stop()
        stop_jvm()

    assert [row.id for row in out] == list(range(len(images)))  # every row once
    built = loads(log)
    pids = [pid for pid, _ in built]
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids) and os.getpid() not in pids  # once per worker
    assert all(threads == 1 for _, threads in built)  # spark.task.cpus (1), not all the cores

    expected = fastvgg.VGG16(weights_file, include_top=False, pooling="avg").predict(fastvgg.preprocess_input(images))
    got = np.array([row.features for row in out], dtype=np.float32)  # Spark floats are float32
    assert got.shape == expected.shape == (len(images), 512)
    np.testing.assert_array_equal(got, expected)
