"""Gradient reducers under real mpirun: buckets started during backward give exactly the fused
allreduce's result, weighted by each rank's batch share."""
import textwrap

from tests.mpi_harness import run_mpi

SCRIPT = textwrap.dedent("""
    import numpy as np
    import torch
    from mpicaffe import prototxt
    from mpicaffe.backends.engine.net import Net
    from mpicaffe.parallel.comm import MPICommunicator
    from mpicaffe.proto import caffe_pb2
    from mpicaffe.parallel.reducer import BucketReducer, FusedReducer

    TEXT = '''
    layer { name: "x" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 } } }
    layer { name: "c" type: "Convolution" bottom: "x" top: "c"
            convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
    layer { name: "i" type: "InnerProduct" bottom: "c" top: "i"
            inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
    layer { name: "l" type: "SoftmaxWithLoss" bottom: "i" bottom: "y" top: "l" }
    '''
    comm = MPICommunicator()
    torch.manual_seed(0)
    param = prototxt.net_for_phase(prototxt.parse_text(TEXT, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    net = Net(param)
    rng = np.random.default_rng(comm.rank)
    net.blobs["x"].data[...] = rng.standard_normal((4, 2, 6, 6))
    net.blobs["y"].data[...] = rng.integers(0, 5, 4)
    weight = 0.75 if comm.rank == 0 else 1.25
    net.forward_backward()
    local = net.flat_diff.numpy().copy()
    results = []
    for reducer in (FusedReducer(comm, [net.flat_diff.numpy()], weight),
                    BucketReducer(comm, net, weight, bucket_bytes=64)):
        net.clear_param_diffs()
        reducer.start()
        net.forward_backward()
        reducer.finish()
        results.append(net.flat_diff.numpy().copy())
    both = comm.allgather(local)
    expected = (both[0] * np.float32(0.75) + both[1] * np.float32(1.25)) * np.float32(0.5)
    assert len(BucketReducer(comm, net, weight, bucket_bytes=64).buckets) >= 3
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_allclose(results[0], expected, rtol=1e-6)
    print("ok", comm.rank)
""")


def test_bucketed_and_fused_reductions_agree(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(SCRIPT)
    result = run_mpi(2, ["python", str(script)], timeout=120)
    assert result.rank_stdout(0) == "ok 0" and result.rank_stdout(1) == "ok 1"
