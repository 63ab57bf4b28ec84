"""The peers' inference code, re-implemented faithfully in eager PyTorch / numpy / OpenCV: the reference of
tests/test_detection_*.py and the baseline pipeline of `python -m dla_fast bench --end-to-end`. Not used by
the fused path. Needs opencv-python-headless (the `test` extra) for the geometry and the pre-processing.

Written after reading (and re-stated in our own code, with the same arithmetic and the same torch.topk calls): CenterNet src/lib/models/decode.py (_nms, _topk, ctdet_decode),
src/lib/models/utils.py (_gather_feat, _transpose_and_gather_feat), src/lib/utils/image.py
(get_affine_transform, affine_transform, transform_preds), src/lib/utils/post_process.py (ctdet_post_process),
src/lib/detectors/base_detector.py (pre_process); FairMOT src/lib/models/decode.py (mot_decode),
src/lib/datasets/dataset/jde.py (letterbox, LoadImages' HWC BGR -> CHW RGB / 255), src/lib/tracker/
multitracker.py (the c, s of its post-processing, F.normalize of the id head); CenterTrack src/lib/model/
decode.py (generic_decode) and src/lib/utils/post_process.py (generic_post_process's transform_preds_with_trans).
The peers' integer divisions `(inds / width).int()` are written as `//` (same values for these index ranges on
the torch versions where `/` became true division).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# CenterNet's / CenterTrack's COCO statistics (datasets/dataset/coco.py)
CENTERNET_MEAN = np.array([0.40789654, 0.44719302, 0.47026115], dtype=np.float32).reshape(1, 1, 3)
CENTERNET_STD = np.array([0.28863828, 0.27408164, 0.27809835], dtype=np.float32).reshape(1, 1, 3)


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"the peers' pre-processing needs OpenCV: pip install opencv-python-headless ({e})") from None
    return cv2


def _peaks(heat):
    """The heatmap with every value that is not the maximum of its 3x3 neighbourhood set to 0 (the peers' "NMS")."""
    neighbourhood_max = F.max_pool2d(heat, (3, 3), stride=1, padding=1)
    return heat * (neighbourhood_max == heat).float()


def gather_at(feature, index):
    """feature (B, C, H, W) read at flat positions index (B, K) of its H*W grid: (B, K, C)."""
    batch, channels = feature.shape[:2]
    rows = feature.permute(0, 2, 3, 1).contiguous().view(batch, -1, channels)
    return rows.gather(1, index.unsqueeze(2).expand(batch, index.shape[1], channels))


def _two_stage_topk(heat, K):
    """The peers' top-K: the K best of every class, then the K best of those (the same two torch.topk calls on
    the same values, so ties come out in their order). Returns scores, flat positions, classes (int), y, x."""
    batch, classes, height, width = heat.shape
    class_scores, class_index = torch.topk(heat.view(batch, classes, -1), K)
    class_index = class_index % (height * width)
    class_y = (class_index // width).int().float()
    class_x = (class_index % width).int().float()
    scores, pick = torch.topk(class_scores.view(batch, -1), K)

    def picked(values):
        return values.view(batch, -1).gather(1, pick)

    return scores, picked(class_index), (pick // K).int(), picked(class_y), picked(class_x)


def _centers(xs, ys, reg, index):
    """(B, K, 1) centres: the peak cell plus the regressed sub-cell offset (or the cell's middle without one)."""
    batch, K = xs.shape
    if reg is None:
        return xs.view(batch, K, 1) + 0.5, ys.view(batch, K, 1) + 0.5
    offset = gather_at(reg, index).view(batch, K, 2)
    return xs.view(batch, K, 1) + offset[:, :, 0:1], ys.view(batch, K, 1) + offset[:, :, 1:2]


def _boxes(x, y, wh):
    """(B, K, 4) boxes x1, y1, x2, y2 of centres (x, y) and sizes wh (B, K, 2)."""
    half_w, half_h = wh[..., 0:1] / 2, wh[..., 1:2] / 2
    return torch.cat([x - half_w, y - half_h, x + half_w, y + half_h], dim=2)


def ctdet_decode(heat, wh, reg=None, cat_spec_wh=False, K=100):
    """CenterNet's ctdet_decode (heat after sigmoid): (B, K, 6) rows x1, y1, x2, y2, score, class."""
    batch, classes = heat.shape[:2]
    scores, index, cls, ys, xs = _two_stage_topk(_peaks(heat), K)
    x, y = _centers(xs, ys, reg, index)
    sizes = gather_at(wh, index)
    if cat_spec_wh:  # one (w, h) per class: the detection's own class's
        per_class = sizes.view(batch, K, classes, 2)
        sizes = per_class.gather(2, cls.view(batch, K, 1, 1).expand(batch, K, 1, 2).long()).view(batch, K, 2)
    else:
        sizes = sizes.view(batch, K, 2)
    return torch.cat([_boxes(x, y, sizes), scores.view(batch, K, 1), cls.view(batch, K, 1).float()], dim=2)


def mot_decode(heat, wh, reg=None, ltrb=False, K=100):
    """FairMOT's mot_decode: ((B, K, 6) detections, (B, K) flat positions); ltrb: wh holds the four distances."""
    batch = heat.shape[0]
    scores, index, cls, ys, xs = _two_stage_topk(_peaks(heat), K)
    x, y = _centers(xs, ys, reg, index)
    sizes = gather_at(wh, index).view(batch, K, 4 if ltrb else 2)
    if ltrb:
        boxes = torch.cat([x - sizes[..., 0:1], y - sizes[..., 1:2], x + sizes[..., 2:3], y + sizes[..., 3:4]], dim=2)
    else:
        boxes = _boxes(x, y, sizes)
    return torch.cat([boxes, scores.view(batch, K, 1), cls.view(batch, K, 1).float()], dim=2), index


def generic_decode(output, K=100):
    """CenterTrack's generic_decode for hm / reg / wh / tracking (zero_tracking off): a dict of (B, K[, n])."""
    heat = output["hm"]
    batch = heat.shape[0]
    scores, index, cls, ys, xs = _two_stage_topk(_peaks(heat), K)
    x, y = _centers(xs, ys, output.get("reg"), index)
    sizes = gather_at(output["wh"], index).view(batch, K, 2)
    sizes = torch.where(sizes < 0, torch.zeros_like(sizes), sizes)  # negative sizes count as 0
    result = {"scores": scores.view(batch, K), "clses": cls.view(batch, K).float(), "xs": xs, "ys": ys,
              "cts": torch.stack([xs, ys], dim=2), "bboxes": _boxes(x, y, sizes), "inds": index}
    if "tracking" in output:
        result["tracking"] = gather_at(output["tracking"], index).view(batch, K, -1)
    return result


# --- geometry and post-processing (numpy + OpenCV) ---

def _quarter_turn(a, b):
    """b + (a - b) turned by 90 degrees: the third point of a right angle at b (float32)."""
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot, output_size, shift=np.array([0, 0], dtype=np.float32), inv=0):
    """CenterNet's get_affine_transform: the (2, 3) float64 matrix (cv2.getAffineTransform of three float32 point
    pairs) from the square of side scale[0] around center, turned by rot degrees and shifted by scale * shift, to
    an output of size (w, h); the reverse mapping with inv."""
    scale = np.array([scale, scale], dtype=np.float32) if np.ndim(scale) == 0 else scale
    angle = np.pi * rot / 180
    half = scale[0] * -0.5
    up = [-half * np.sin(angle), half * np.cos(angle)]  # (0, half) turned by angle
    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale * shift
    src[1] = center + up + scale * shift
    src[2] = _quarter_turn(src[0], src[1])
    out_w, out_h = output_size[0], output_size[1]
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = np.array([out_w * 0.5, out_h * 0.5], np.float32) + np.array([0, out_w * -0.5], np.float32)
    dst[2] = _quarter_turn(dst[0], dst[1])
    pair = (dst, src) if inv else (src, dst)
    return _cv2().getAffineTransform(*pair)


def transform_preds(coords, center, scale, output_size):
    """Points (N, 2) of an output map back to the image (float64), one point at a time as the peers do."""
    back = get_affine_transform(center, scale, 0, output_size, inv=1)
    moved = np.zeros(coords.shape)
    for k, (px, py) in enumerate(coords[:, 0:2]):
        moved[k, 0:2] = np.dot(back, np.array([px, py, 1.0], dtype=np.float32))[:2]
    return moved


def ctdet_post_process(dets, c, s, h, w, num_classes):
    """CenterNet's ctdet_post_process: per image a dict class (1-based) -> list of [x1, y1, x2, y2, score] in
    image pixels; dets (B, K, 6) numpy is moved to image coordinates in place, as the peers' is."""
    per_image = []
    for i, image_dets in enumerate(dets):
        image_dets[:, 0:2] = transform_preds(image_dets[:, 0:2], c[i], s[i], (w, h))
        image_dets[:, 2:4] = transform_preds(image_dets[:, 2:4], c[i], s[i], (w, h))
        rows = image_dets[:, :5].astype(np.float32)
        per_image.append({k + 1: rows[image_dets[:, -1] == k].tolist() for k in range(num_classes)})
    return per_image


def merge_outputs(detections, num_classes, max_per_image=100):
    """CtdetDetector.merge_outputs for one scale: per class (N, 5) float32, only scores among the
    max_per_image best (ties at the threshold kept)."""
    results = {k: np.concatenate([d[k] for d in detections], axis=0).astype(np.float32)
               for k in range(1, num_classes + 1)}
    scores = np.hstack([rows[:, 4] for rows in results.values()])
    surplus = len(scores) - max_per_image
    if surplus > 0:
        threshold = np.partition(scores, surplus)[surplus]
        results = {k: rows[rows[:, 4] >= threshold] for k, rows in results.items()}
    return results


def generic_post_process(dets, c, s, h, w, out_thresh):
    """CenterTrack's generic_post_process for scores / clses / cts / tracking / bboxes: per image a list of
    {'score', 'class', 'ct', 'tracking', 'bbox'} items, stopping at the first score below out_thresh."""
    per_image = []
    for i, image_scores in enumerate(dets["scores"]):
        back = get_affine_transform(c[i], s[i], 0, (w, h), inv=1).astype(np.float32)
        items = []
        for j, score in enumerate(image_scores):
            if score < out_thresh:
                break
            center = transform_preds_with_trans(dets["cts"][i][j].reshape(1, 2), back).reshape(2)
            item = {"score": score, "class": int(dets["clses"][i][j]) + 1, "ct": center}
            if "tracking" in dets:
                moved = (dets["tracking"][i][j] + dets["cts"][i][j]).reshape(1, 2)
                item["tracking"] = transform_preds_with_trans(moved, back).reshape(2) - center
            if "bboxes" in dets:
                item["bbox"] = transform_preds_with_trans(dets["bboxes"][i][j].reshape(2, 2), back).reshape(4)
            items.append(item)
        per_image.append(items)
    return per_image


def ctdet_post_process_boxes(dets, c, s, h, w):
    """ctdet_post_process's coordinate step alone (no per-class split), on a copy: dets (B, K, 6) float32."""
    moved = dets.copy()
    for i, image_dets in enumerate(moved):
        for corner in (slice(0, 2), slice(2, 4)):
            image_dets[:, corner] = transform_preds(image_dets[:, corner], c[i], s[i], (w, h))
    return moved


def transform_preds_with_trans(coords, trans):
    """Points (N, 2) through a (2, 3) matrix, in float32 homogeneous coordinates (CenterTrack's helper)."""
    homogeneous = np.ones((coords.shape[0], 3), np.float32)
    homogeneous[:, :2] = coords
    return (trans @ homogeneous.T).T[:, :2]


def centernet_pre_process(image, input_h, input_w, down_ratio=4, mean=CENTERNET_MEAN, std=CENTERNET_STD):
    """CenterNet's base_detector.pre_process at scale 1 with fix_res: the image (HWC uint8 BGR) warped onto
    input_h x input_w around its centre, normalized: ((1, 3, H, W) float32 numpy, meta with c, s)."""
    cv2 = _cv2()
    height, width = image.shape[0:2]
    center = np.array([width / 2., height / 2.], dtype=np.float32)
    side = max(height, width) * 1.0
    warp = get_affine_transform(center, side, 0, [input_w, input_h])
    same_size = cv2.resize(image, (int(width), int(height)))  # scale 1: the peers' resize keeps the size
    warped = cv2.warpAffine(same_size, warp, (input_w, input_h), flags=cv2.INTER_LINEAR)
    normalized = ((warped / 255. - mean) / std).astype(np.float32)
    meta = {"c": center, "s": side, "out_height": input_h // down_ratio, "out_width": input_w // down_ratio}
    return normalized.transpose(2, 0, 1).reshape(1, 3, input_h, input_w), meta


def letterbox(img, height=608, width=1088, color=(127.5, 127.5, 127.5)):
    """FairMOT's letterbox: resized by min(height / h, width / w) (INTER_AREA), centred on a height x width
    canvas of `color`; returns (image, ratio, dw, dh)."""
    cv2 = _cv2()
    ratio = min(float(height) / img.shape[0], float(width) / img.shape[1])
    new_w, new_h = round(img.shape[1] * ratio), round(img.shape[0] * ratio)
    dw, dh = (width - new_w) / 2, (height - new_h) / 2
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    padded = cv2.copyMakeBorder(resized, round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1),
                                cv2.BORDER_CONSTANT, value=color)
    return padded, ratio, dw, dh


def fairmot_pre_process(img0, height, width, down_ratio=4):
    """FairMOT's LoadImages step (letterbox, BGR -> RGB, CHW, / 255) and its tracker's meta (c, s)."""
    boxed = letterbox(img0, height=height, width=width)[0]
    chw = np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32)
    chw /= 255.0
    h0, w0 = img0.shape[:2]
    center = np.array([w0 / 2., h0 / 2.], dtype=np.float32)
    side = max(float(width) / float(height) * h0, w0) * 1.0
    meta = {"c": center, "s": side, "out_height": height // down_ratio, "out_width": width // down_ratio}
    return chw[None], meta


def fairmot_embeddings(id_feature, inds):
    """FairMOT's re-ID features: the L2-normalized id head read at the detections' positions (B, K, C)."""
    return gather_at(F.normalize(id_feature, dim=1), inds)
