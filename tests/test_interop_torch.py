"""cucrf.torch: the autograd function (gradcheck), the ConvCRF module, end-to-end training."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cucrf  # noqa: E402
import cucrf.torch as ct  # noqa: E402

rng = np.random.default_rng(1)
SMALL = dict(filter_size=3, iterations=2)


def tensor(a, **kw):
    return torch.tensor(np.asarray(a), dtype=torch.float64, **kw)


def tiny_problem(batch=1, classes=3, height=5, width=6, channels=2):
    unary = tensor(rng.normal(size=(batch, classes, height, width)), requires_grad=True)
    # Features in [0, 1] with theta_beta 0.5: the appearance kernel varies smoothly (well-conditioned).
    image = tensor(rng.uniform(size=(batch, height, width, channels)), requires_grad=True)
    values = dict(theta_alpha=3.0, theta_beta=0.5, theta_gamma=2.0, appearance_weight=1.5, smoothness_weight=0.7,
                  unary_weight=1.2)
    params = {k: tensor(v, requires_grad=True) for k, v in values.items()}
    params["compatibility"] = tensor(1 - np.eye(classes) + 0.1 * rng.normal(size=(classes, classes)),
                                     requires_grad=True)
    return unary, image, params


@pytest.mark.parametrize("settings", [
    dict(blur=1, output="probabilities"),
    dict(blur=2, output="logits", normalization="symmetric"),
])
def test_gradcheck_every_input(settings):
    unary, image, params = tiny_problem()
    names = list(params)

    def f(u, im, *values):
        return ct.infer(u, im, dict(zip(names, values)), **SMALL, **settings)

    assert torch.autograd.gradcheck(f, (unary, image, *params.values()))


def test_gradcheck_batch_per_channel_theta_beta_and_potts():
    unary, image, params = tiny_problem(batch=2, classes=2, height=4, width=5)
    theta_beta = tensor([0.4, 0.6], requires_grad=True)

    def f(u, im, tb, w):
        return ct.infer(u, im, {"theta_beta": tb, "appearance_weight": w, "compatibility": "potts"}, blur=2,
                        spatial_dims=2, **SMALL)

    assert torch.autograd.gradcheck(f, (unary, image, theta_beta, params["appearance_weight"]))


def test_forward_and_gradients_match_cucrf():
    unary, image, params = tiny_problem()
    q = ct.infer(unary, image, params, blur=2, **SMALL)
    fixed = cucrf.CRFParams(**{k: (v.detach().numpy() if k == "compatibility" else float(v.detach()))
                               for k, v in params.items()})
    u, im = unary.detach().numpy(), image.detach().numpy()
    np.testing.assert_array_equal(q.detach().numpy(), cucrf.infer(u, im, fixed, blur=2, **SMALL))
    g = rng.normal(size=q.shape)
    q.backward(tensor(g))
    r = cucrf.infer_vjp(u, im, fixed, grad_output=g, blur=2, **SMALL)
    np.testing.assert_array_equal(unary.grad.numpy(), r.unary)
    np.testing.assert_array_equal(image.grad.numpy(), r.image)
    for name, value in params.items():
        np.testing.assert_allclose(value.grad.numpy(), r.params[name], rtol=1e-12)


def test_float32_integer_image_and_unbatched():
    unary = torch.randn(3, 10, 12, requires_grad=True)
    image = torch.randint(0, 255, (10, 12, 3), dtype=torch.uint8)
    q = ct.infer(unary, image, blur=2)
    assert q.shape == unary.shape and q.dtype == torch.float32
    q[0].sum().backward()
    assert unary.grad.shape == unary.shape and unary.grad.dtype == torch.float32


def test_no_grad_runs_plain_inference():
    unary, image, params = tiny_problem()
    with torch.no_grad():
        q = ct.infer(unary, image, params, blur=2, **SMALL)
    assert not q.requires_grad


def test_in_place_change_before_backward_is_detected():
    unary, image, params = tiny_problem()
    q = ct.infer(unary, image, params, blur=2, **SMALL)
    with torch.no_grad():
        image.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        q.sum().backward()


def test_errors():
    unary, image, _ = tiny_problem()
    with pytest.raises(TypeError, match="unary must be a torch.Tensor"):
        ct.infer(unary.detach().numpy(), image)
    with pytest.raises(ValueError, match="unary is on cpu but image on meta"):
        ct.infer(unary, torch.empty(image.shape, device="meta"))
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        ct.infer(unary, image, {"theta": 1.0})
    with pytest.raises(ValueError, match="theta_alpha must be finite and > 0"):
        ct.infer(unary, image, {"theta_alpha": tensor(-1.0)})
    with pytest.raises(ValueError, match="output must be one of"):
        ct.infer(unary, image, output="labels")
    with pytest.raises(ValueError, match="compatibility must be a \\(C, C\\) tensor"):
        ct.infer(unary, image, {"compatibility": tensor([1.0, 2.0])})


# -- the module ---------------------------------------------------------------------------------------

def test_module_parameters_and_buffers():
    crf = ct.ConvCRF(num_classes=4, params=cucrf.CRFParams(theta_beta=(10.0, 20.0, 30.0)), blur=2)
    names = dict(crf.named_parameters())
    assert sorted(names) == ["appearance_weight", "compatibility", "log_theta_alpha", "log_theta_beta",
                             "log_theta_gamma", "smoothness_weight", "unary_weight"]
    assert names["log_theta_beta"].shape == (3,) and names["compatibility"].shape == (4, 4)
    np.testing.assert_allclose(names["compatibility"].detach().numpy(), 1 - np.eye(4))
    p = crf.crf_params()
    assert p.theta_beta == pytest.approx((10.0, 20.0, 30.0), rel=1e-6)
    assert p.theta_alpha == pytest.approx(80.0, rel=1e-6)

    fixed = ct.ConvCRF(learn=("weights",))
    assert sorted(n for n, _ in fixed.named_parameters()) == ["appearance_weight", "smoothness_weight"]
    assert fixed.compatibility is None and fixed.crf_params().is_potts
    assert "log_theta_alpha" in fixed.state_dict()
    assert list(ct.ConvCRF(learn=()).parameters()) == []


def test_module_errors():
    with pytest.raises(ValueError, match="needs num_classes"):
        ct.ConvCRF()
    with pytest.raises(ValueError, match="unknown name.*torch layer on the image"):
        ct.ConvCRF(num_classes=2, learn=("feature_transform",))
    with pytest.raises(ValueError, match="filter_size must be odd"):
        ct.ConvCRF(num_classes=2, filter_size=4)
    with pytest.raises(ValueError, match="2x2 but num_classes=3"):
        ct.ConvCRF(num_classes=3, params=cucrf.CRFParams(compatibility=[[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="output must be one of"):
        ct.ConvCRF(num_classes=2, output="labels")


def test_module_matches_infer_and_gradcheck_in_log_space():
    crf = ct.ConvCRF(num_classes=3, filter_size=3, blur=2, iterations=2, output="probabilities",
                     params=cucrf.CRFParams(theta_beta=0.5, theta_alpha=3.0, theta_gamma=2.0,
                                            appearance_weight=1.5, smoothness_weight=0.7)).double()
    unary, image, _ = tiny_problem()
    q = crf(unary, image)
    np.testing.assert_allclose(q.detach().numpy(), cucrf.infer(unary.detach().numpy(), image.detach().numpy(),
                                                               crf.crf_params(), filter_size=3, blur=2, iterations=2),
                               rtol=1e-12, atol=1e-14)
    names = [name for name, _ in crf.named_parameters()]

    def f(*values):  # the module as a function of its parameters (log-bandwidths, weights, ...)
        return torch.func.functional_call(crf, dict(zip(names, values)), (unary.detach(), image.detach()))

    assert torch.autograd.gradcheck(f, tuple(p.detach().clone().requires_grad_() for p in crf.parameters()))


def make_batch(n, size=20, generator=None):
    """Synthetic segmentation: a noisy disc of one colour on a noisy background of another."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = torch.randint(6, size - 6, (2,), generator=generator)
        r = torch.randint(3, 7, (1,), generator=generator)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        image = torch.where(mask[..., None], torch.tensor([200.0, 60.0, 40.0]), torch.tensor([40.0, 90.0, 160.0]))
        images.append(image + 25 * torch.randn(size, size, 3, generator=generator))
        labels.append(mask.long())
    return torch.stack(images), torch.stack(labels)  # (N, H, W, 3) channels-last, (N, H, W)


def test_end_to_end_training_lowers_the_loss():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images, labels = make_batch(6, generator=generator)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 2, 3, padding=1))
    crf = ct.ConvCRF(num_classes=2, params=cucrf.CRFParams(appearance_weight=0.1, smoothness_weight=0.05,
                                                           theta_beta=30.0),
                     filter_size=5, blur=2, iterations=3)
    start = {name: p.detach().clone() for name, p in crf.named_parameters()}
    optimiser = torch.optim.Adam([*net.parameters(), *crf.parameters()], lr=0.02)
    losses = []
    for _ in range(12):
        logits = net(images.permute(0, 3, 1, 2) / 255)
        loss = torch.nn.functional.cross_entropy(crf(logits, images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.25 * losses[0]
    assert np.mean(losses[-3:]) < np.mean(losses[3:6]) < np.mean(losses[:3])
    assert all(not torch.equal(p, start[name]) for name, p in crf.named_parameters())  # every CRF parameter learned
    assert net[0].weight.grad is not None


# -- GPU (skipped without CUDA) -----------------------------------------------------------------------

def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy sees no GPU")
    return cupy


def test_cuda_gradients_match_the_cpu():
    cuda()
    unary, image, params = tiny_problem(height=16, width=20)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    q = ct.infer(unary, image, params, blur=2, **SMALL)
    g = tensor(rng.normal(size=q.shape))
    q.backward(g)
    on_gpu = [t.detach().to(device).requires_grad_() for t in (unary, image, *params.values())]
    qg = ct.infer(on_gpu[0], on_gpu[1], dict(zip(params, on_gpu[2:])), blur=2, **SMALL)
    assert qg.device == device
    qg.backward(g.to(device))
    np.testing.assert_allclose(qg.detach().cpu().numpy(), q.detach().numpy(), atol=1e-10)
    for cpu, gpu in zip((unary, image, *params.values()), on_gpu):
        assert gpu.grad.device == device
        np.testing.assert_allclose(gpu.grad.cpu().numpy(), cpu.grad.numpy(), rtol=1e-7, atol=1e-9)


def test_cuda_post_processing_has_no_host_round_trip(monkeypatch):
    cupy = cuda()

    def refuse(*args, **kwargs):
        raise AssertionError("a host round trip")

    logits = torch.randn(4, 5, 64, 80, device="cuda")
    images = torch.randint(0, 255, (4, 64, 80, 3), dtype=torch.uint8, device="cuda")
    expected = cucrf.infer(logits.cpu(), images.cpu())
    monkeypatch.setattr(cupy.ndarray, "get", refuse)
    monkeypatch.setattr(cupy, "asnumpy", refuse)
    monkeypatch.setattr(np, "from_dlpack", refuse)
    refined = cucrf.infer(logits, images, like="input")
    with torch.no_grad():
        crf = ct.ConvCRF(learn=()).cuda()
        out = crf(logits, images)
    monkeypatch.undo()
    assert refined.device == logits.device and out.device == logits.device
    np.testing.assert_allclose(refined.cpu().numpy(), expected, atol=1e-4)


# -- documentation ------------------------------------------------------------------------------------

def test_docstring_examples():
    import doctest

    result = doctest.testmod(ct, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
