"""Deletion and insertion curves: exact on classifiers built to read one position, endpoints equal
to the model's probabilities on the untouched and the all-baseline input, the ideal ranking beats
its reverse, only content tokens move, batching changes nothing, bad input is one ValueError line."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tformer.analysis.attribution import blurred, token_baseline
from tformer.analysis.faithfulness import aopc, auc, perturbation_curves, random_ranking
from tformer.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, SEP, PAD, MASK = 2, 3, 0, 4  # special ids of the toy vocabulary below
HIGH, LOW = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()


class OnePatch(nn.Module):
    """An image classifier (4x4 grey images, 2x2 patches, no config: the grid comes from the
    ranking) whose class-0 logit is 10 (mean of patch `patch`'s pixels - 0.5): class 0 with
    p = sigmoid(5) when that patch is white, p = sigmoid(-5) when it is black."""

    labels = ("on", "off")
    image_shape = (4, 4, 1)

    def __init__(self, patch: int) -> None:
        super().__init__()
        self.row, self.col = divmod(patch, 2)

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        r, c = 2 * self.row, 2 * self.col
        logit = 10 * (inputs[:, 0, r:r + 2, c:c + 2].mean(dim=(1, 2)) - 0.5)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class OneToken(nn.Module):
    """A text classifier whose class-0 logit is +5 when token `position` is `word` and -5 when
    it is not; it keeps every input it sees, so tests can check what was perturbed."""

    labels = ("yes", "no")
    max_tokens = 16

    def __init__(self, position: int, word: int) -> None:
        super().__init__()
        self.position, self.word = position, word
        self.seen: list[Tensor] = []

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        self.seen.append(inputs.clone())
        logit = 10 * ((inputs[:, self.position] == self.word).float() - 0.5)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def bert() -> nn.Module:
    torch.manual_seed(0)  # init_std 0.2: a random classifier whose logits differ across inputs
    return build_model("bert-tiny", vocab_size=60, context_length=16, head="sequence", labels=("neg", "pos"),
                       init_std=0.2).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit-digits", n_layers=2, init_std=0.2).eval()


def sentences() -> tuple[Tensor, Tensor]:
    """[CLS] words [SEP] ids (2, 9), the second row right-padded by 2."""
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (2, 9))
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    ids[1, -3], ids[1, -2:], mask[1, -2:] = SEP, PAD, 0
    return ids, mask


def images(rows: int = 3) -> Tensor:
    torch.manual_seed(2)
    return torch.rand(rows, 1, 8, 8)


def probability(logits: Tensor, target: Tensor) -> Tensor:
    return torch.softmax(logits, -1).gather(1, target.unsqueeze(1)).squeeze(1)


def test_a_hand_built_ranking_gives_the_expected_step_curves():
    """Patch 2 decides; a ranking that puts it at rank r deletes it at level r + 1 (steps = 4 =
    patches) and shows it from level r + 1 on insertion."""
    white_patch = torch.zeros(1, 1, 4, 4)
    white_patch[..., 2:4, 0:2] = 1.0  # patch 2 (row 1, column 0)
    for rank in range(4):
        ranking = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        ranking[0, [2, 3 - rank]] = ranking[0, [3 - rank, 2]]  # patch 2 gets score 3 - rank
        curves = perturbation_curves(OnePatch(2), white_patch, ranking, 0.0, steps=4)
        torch.testing.assert_close(curves.deletion, torch.tensor([[HIGH] * (rank + 1) + [LOW] * (4 - rank)]))
        torch.testing.assert_close(curves.insertion, torch.tensor([[LOW] * (rank + 1) + [HIGH] * (4 - rank)]))
        assert curves.target.tolist() == [0] and curves.n_positions.tolist() == [4]
        torch.testing.assert_close(curves.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1]))
        # trapezoids: a step from HIGH to LOW between f = rank/4 and (rank + 1)/4
        area = (rank * HIGH + (HIGH + LOW) / 2 + (3 - rank) * LOW) / 4
        torch.testing.assert_close(curves.deletion_auc, torch.tensor([area]))
        torch.testing.assert_close(curves.insertion_auc, torch.tensor([HIGH + LOW - area]))
        torch.testing.assert_close(curves.aopc, torch.tensor([(4 - rank) / 5 * (HIGH - LOW)]))


def test_only_content_tokens_move_and_levels_round_half_up():
    """Token 3 decides. [CLS], [SEP] and padding keep their ids in every input the model sees,
    whatever their scores; 4 content tokens at steps = 8 are k = round(i / 2) = 0 1 1 2 2 3 3 4 4
    (halves up); the decisive token ranked second leaves at k = 2."""
    ids = torch.tensor([[CLS, 11, 12, 13, 14, SEP, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    model = OneToken(position=3, word=13)
    ranking = torch.tensor([[9.0, 1.0, 5.0, 4.0, 0.0, 8.0, 7.0]])  # frame scored high: ignored
    curves = perturbation_curves(model, ids, ranking, MASK, mask=mask, steps=8)
    torch.testing.assert_close(curves.deletion, torch.tensor([[HIGH] * 3 + [LOW] * 6]))  # gone from k = 2
    torch.testing.assert_close(curves.insertion, torch.tensor([[LOW] * 3 + [HIGH] * 6]))  # shown from k = 2
    assert curves.n_positions.tolist() == [4]
    seen = torch.cat(model.seen)
    assert (seen[:, [0, 5, 6]] == torch.tensor([CLS, SEP, PAD])).all()
    assert set(seen[:, 1:5].unique().tolist()) == {11, 12, 13, 14, MASK}
    assert len(seen) == 1 + 2 * 5  # the prediction, then each distinct k (0..4) once per curve


def test_curves_start_and_end_at_the_models_probabilities():
    """Deletion runs from p(input) to p(all-baseline input), insertion the other way, on a real
    BERT classifier (padding, [MASK] baseline) and a real ViT (blurred baseline)."""
    b, ids_mask = bert(), sentences()
    ids, mask = ids_mask
    text = perturbation_curves(b, ids, random_ranking(tuple(ids.shape), seed=3), MASK, mask=mask, steps=5)
    with torch.no_grad():
        untouched = probability(b.classify(ids, mask), text.target)
        emptied = probability(b.classify(token_baseline(ids, MASK, keep=(CLS, SEP, PAD)), mask), text.target)
    v, x = vit(), images()
    base = blurred(x, sigma=1.0)
    image = perturbation_curves(v, x, random_ranking((3, 16), seed=3), base, steps=5)
    with torch.no_grad():
        untouched_image = probability(v.classify(x), image.target)
        emptied_image = probability(v.classify(base), image.target)
    for curves, first, last in ((text, untouched, emptied), (image, untouched_image, emptied_image)):
        assert (first - last).abs().min() > 1e-3, "the test model must notice the baseline"
        torch.testing.assert_close(curves.deletion[:, 0], first)
        torch.testing.assert_close(curves.deletion[:, -1], last)
        torch.testing.assert_close(curves.insertion[:, 0], last)
        torch.testing.assert_close(curves.insertion[:, -1], first)
    assert text.n_positions.tolist() == [7, 5]


def occlusion_ranking(model: nn.Module, x: Tensor, base: Tensor, grid: int = 4) -> Tensor:
    """Drop in the predicted class's probability when one patch alone is replaced: (B, grid²)."""
    with torch.no_grad():
        target = model.classify(x).argmax(-1)
        full = probability(model.classify(x), target)
        size = x.shape[-1] // grid
        drops = []
        for patch in range(grid * grid):
            r, c = divmod(patch, grid)
            occluded = x.clone()
            occluded[..., r * size:(r + 1) * size, c * size:(c + 1) * size] = \
                base[..., r * size:(r + 1) * size, c * size:(c + 1) * size]
            drops.append(full - probability(model.classify(occluded), target))
    return torch.stack(drops, dim=1)


def test_the_ideal_ranking_beats_its_reverse():
    """On the one-patch classifier for every decisive patch, and on a random ViT with the
    occlusion ranking (each patch's own effect): deletion falls faster, insertion rises faster."""
    white = torch.ones(1, 1, 4, 4)
    for patch in range(4):
        ideal = torch.zeros(1, 4)
        ideal[0, patch] = 1.0
        good = perturbation_curves(OnePatch(patch), white, ideal, 0.0, steps=4)
        bad = perturbation_curves(OnePatch(patch), white, -ideal, 0.0, steps=4)
        assert (good.deletion_auc < bad.deletion_auc - 0.5).all()
        assert (good.insertion_auc > bad.insertion_auc + 0.5).all()
        assert (good.aopc > bad.aopc + 0.5).all()
    v, x = vit(), images(4)
    base = blurred(x, sigma=1.0)
    ranking = occlusion_ranking(v, x, base)
    good = perturbation_curves(v, x, ranking, base, steps=16)
    bad = perturbation_curves(v, x, -ranking, base, steps=16)
    assert good.deletion_auc.mean() < bad.deletion_auc.mean() - 0.1, (good.deletion_auc, bad.deletion_auc)
    assert good.insertion_auc.mean() > bad.insertion_auc.mean() + 0.1, (good.insertion_auc, bad.insertion_auc)


def test_batching_and_repeats_change_nothing():
    """One row per forward equals everything in one forward; a second call gives the same numbers."""
    b, (ids, mask) = bert(), sentences()
    ranking = random_ranking(tuple(ids.shape), seed=5)
    one = perturbation_curves(b, ids, ranking, MASK, mask=mask, steps=7, rows_per_forward=1)
    many = perturbation_curves(b, ids, ranking, MASK, mask=mask, steps=7, rows_per_forward=1000)
    torch.testing.assert_close(one.deletion, many.deletion, atol=1e-6, rtol=0)
    torch.testing.assert_close(one.insertion, many.insertion, atol=1e-6, rtol=0)
    again = perturbation_curves(b, ids, ranking, MASK, mask=mask, steps=7, rows_per_forward=1000)
    assert torch.equal(again.deletion, many.deletion)
    b.train()
    trained_mode = perturbation_curves(b, ids, ranking, MASK, mask=mask, steps=7)
    assert b.training  # mode restored, dropout off inside
    torch.testing.assert_close(trained_mode.deletion, many.deletion)


def test_a_given_target_and_the_summaries():
    v, x = vit(), images(2)
    curves = perturbation_curves(v, x, random_ranking((2, 16)), 0.0, steps=4, target=torch.tensor([7, 1]))
    with torch.no_grad():
        torch.testing.assert_close(curves.deletion[:, 0], probability(v.classify(x), torch.tensor([7, 1])))
    curve = torch.tensor([[1.0, 0.5, 0.0]])
    torch.testing.assert_close(auc(curve, torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.5]))
    torch.testing.assert_close(aopc(curve), torch.tensor([0.5]))  # (0 + 0.5 + 1) / 3


def test_random_ranking_is_seeded():
    assert torch.equal(random_ranking((3, 5), seed=1), random_ranking((3, 5), seed=1))
    assert not torch.equal(random_ranking((3, 5), seed=1), random_ranking((3, 5), seed=2))
    assert random_ranking((3, 5)).shape == (3, 5)


def test_bad_input_is_one_line(one_line_error):
    b, (ids, mask) = bert(), sentences()
    v, x = vit(), images(2)
    good_text, good_image = torch.zeros(2, 9), torch.zeros(2, 16)
    assert "one score per token" in one_line_error(lambda: perturbation_curves(b, ids, torch.zeros(2, 8), MASK,
                                                                                mask=mask))
    assert "batch 2" in one_line_error(lambda: perturbation_curves(b, ids, torch.zeros(3, 9), MASK, mask=mask))
    assert "one score per patch, (batch, 16)" in one_line_error(
        lambda: perturbation_curves(v, x, torch.zeros(2, 17), 0.0))
    assert "square grid" in one_line_error(
        lambda: perturbation_curves(OnePatch(0), torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), 0.0))
    assert "steps must be an integer >= 1" in one_line_error(
        lambda: perturbation_curves(v, x, good_image, 0.0, steps=0))
    assert "rows_per_forward" in one_line_error(
        lambda: perturbation_curves(v, x, good_image, 0.0, rows_per_forward=0))
    assert "baseline must be an image shaped like the input (2 or 1, 1, 8, 8)" in one_line_error(
        lambda: perturbation_curves(v, x, good_image, torch.zeros(2, 1, 4, 4)))
    assert "baseline must be token ids" in one_line_error(
        lambda: perturbation_curves(b, ids, good_text, ids[:, :5], mask=mask))
    assert "token id" in one_line_error(lambda: perturbation_curves(b, ids, good_text, 0.5, mask=mask))
    assert "mask must be shaped like ids" in one_line_error(
        lambda: perturbation_curves(b, ids, good_text, MASK, mask=mask[:, :4]))
    assert "images must be float" in one_line_error(lambda: perturbation_curves(v, x[:, :, :4], good_image, 0.0))
    assert "finite" in one_line_error(
        lambda: perturbation_curves(v, x, torch.full((2, 16), float("nan")), 0.0))
    assert "target must be (2,)" in one_line_error(
        lambda: perturbation_curves(v, x, good_image, 0.0, target=torch.tensor([10, 0])))
    gpt = build_model("gpt-nano", vocab_size=50, context_length=16)
    assert "text or image classifier" in one_line_error(lambda: perturbation_curves(gpt, ids, good_text, MASK))
    assert "shape must be" in one_line_error(lambda: random_ranking((0, 3)))
