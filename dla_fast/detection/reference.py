"""The peers' inference code, re-implemented faithfully in eager PyTorch / numpy / OpenCV: the reference of
tests/test_detection_*.py and the baseline pipeline of `python -m dla_fast bench --end-to-end`. Not used by
the fused path. Needs opencv-python-headless (the `test` extra) for the geometry and the pre-processing.

Written from reading (not copied): CenterNet src/lib/models/decode.py (_nms, _topk, ctdet_decode),
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


def _nms(heat, kernel=3):
    pad = (kernel - 1) // 2
    hmax = nn.functional.max_pool2d(heat, (kernel, kernel), stride=1, padding=pad)
    keep = (hmax == heat).float()
    return heat * keep


def _gather_feat(feat, ind):
    dim = feat.size(2)
    ind = ind.unsqueeze(2).expand(ind.size(0), ind.size(1), dim)
    return feat.gather(1, ind)


def _transpose_and_gather_feat(feat, ind):
    feat = feat.permute(0, 2, 3, 1).contiguous()
    feat = feat.view(feat.size(0), -1, feat.size(3))
    return _gather_feat(feat, ind)


def _topk(scores, K=40):
    batch, cat, height, width = scores.size()
    topk_scores, topk_inds = torch.topk(scores.view(batch, cat, -1), K)
    topk_inds = topk_inds % (height * width)
    topk_ys = (topk_inds // width).int().float()
    topk_xs = (topk_inds % width).int().float()
    topk_score, topk_ind = torch.topk(topk_scores.view(batch, -1), K)
    topk_clses = (topk_ind // K).int()
    topk_inds = _gather_feat(topk_inds.view(batch, -1, 1), topk_ind).view(batch, K)
    topk_ys = _gather_feat(topk_ys.view(batch, -1, 1), topk_ind).view(batch, K)
    topk_xs = _gather_feat(topk_xs.view(batch, -1, 1), topk_ind).view(batch, K)
    return topk_score, topk_inds, topk_clses, topk_ys, topk_xs


def ctdet_decode(heat, wh, reg=None, cat_spec_wh=False, K=100):
    batch, cat, height, width = heat.size()
    heat = _nms(heat)
    scores, inds, clses, ys, xs = _topk(heat, K=K)
    if reg is not None:
        reg = _transpose_and_gather_feat(reg, inds).view(batch, K, 2)
        xs = xs.view(batch, K, 1) + reg[:, :, 0:1]
        ys = ys.view(batch, K, 1) + reg[:, :, 1:2]
    else:
        xs = xs.view(batch, K, 1) + 0.5
        ys = ys.view(batch, K, 1) + 0.5
    wh = _transpose_and_gather_feat(wh, inds)
    if cat_spec_wh:
        wh = wh.view(batch, K, cat, 2)
        clses_ind = clses.view(batch, K, 1, 1).expand(batch, K, 1, 2).long()
        wh = wh.gather(2, clses_ind).view(batch, K, 2)
    else:
        wh = wh.view(batch, K, 2)
    clses = clses.view(batch, K, 1).float()
    scores = scores.view(batch, K, 1)
    bboxes = torch.cat([xs - wh[..., 0:1] / 2, ys - wh[..., 1:2] / 2,
                        xs + wh[..., 0:1] / 2, ys + wh[..., 1:2] / 2], dim=2)
    return torch.cat([bboxes, scores, clses], dim=2)


def mot_decode(heat, wh, reg=None, ltrb=False, K=100):
    batch, cat, height, width = heat.size()
    heat = _nms(heat)
    scores, inds, clses, ys, xs = _topk(heat, K=K)
    if reg is not None:
        reg = _transpose_and_gather_feat(reg, inds).view(batch, K, 2)
        xs = xs.view(batch, K, 1) + reg[:, :, 0:1]
        ys = ys.view(batch, K, 1) + reg[:, :, 1:2]
    else:
        xs = xs.view(batch, K, 1) + 0.5
        ys = ys.view(batch, K, 1) + 0.5
    wh = _transpose_and_gather_feat(wh, inds)
    wh = wh.view(batch, K, 4) if ltrb else wh.view(batch, K, 2)
    clses = clses.view(batch, K, 1).float()
    scores = scores.view(batch, K, 1)
    if ltrb:
        bboxes = torch.cat([xs - wh[..., 0:1], ys - wh[..., 1:2], xs + wh[..., 2:3], ys + wh[..., 3:4]], dim=2)
    else:
        bboxes = torch.cat([xs - wh[..., 0:1] / 2, ys - wh[..., 1:2] / 2,
                            xs + wh[..., 0:1] / 2, ys + wh[..., 1:2] / 2], dim=2)
    return torch.cat([bboxes, scores, clses], dim=2), inds


def generic_decode(output, K=100):
    """CenterTrack's generic_decode for hm / reg / wh / tracking (zero_tracking off)."""
    heat = output["hm"]
    batch, cat, height, width = heat.size()
    heat = _nms(heat)
    scores, inds, clses, ys0, xs0 = _topk(heat, K=K)
    clses = clses.view(batch, K)
    scores = scores.view(batch, K)
    cts = torch.cat([xs0.unsqueeze(2), ys0.unsqueeze(2)], dim=2)
    ret = {"scores": scores, "clses": clses.float(), "xs": xs0, "ys": ys0, "cts": cts}
    if "reg" in output:
        reg = _transpose_and_gather_feat(output["reg"], inds).view(batch, K, 2)
        xs = xs0.view(batch, K, 1) + reg[:, :, 0:1]
        ys = ys0.view(batch, K, 1) + reg[:, :, 1:2]
    else:
        xs = xs0.view(batch, K, 1) + 0.5
        ys = ys0.view(batch, K, 1) + 0.5
    wh = _transpose_and_gather_feat(output["wh"], inds).view(batch, K, 2)
    wh[wh < 0] = 0
    ret["bboxes"] = torch.cat([xs - wh[..., 0:1] / 2, ys - wh[..., 1:2] / 2,
                               xs + wh[..., 0:1] / 2, ys + wh[..., 1:2] / 2], dim=2)
    if "tracking" in output:
        ret["tracking"] = _transpose_and_gather_feat(output["tracking"], inds).view(batch, K, -1)
    ret["inds"] = inds
    return ret


# --- geometry and post-processing (numpy + OpenCV) ---

def get_dir(src_point, rot_rad):
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [src_point[0] * cs - src_point[1] * sn, src_point[0] * sn + src_point[1] * cs]


def get_3rd_point(a, b):
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot, output_size, shift=np.array([0, 0], dtype=np.float32), inv=0):
    if not isinstance(scale, np.ndarray) and not isinstance(scale, list):
        scale = np.array([scale, scale], dtype=np.float32)
    src_w = scale[0]
    dst_w, dst_h = output_size[0], output_size[1]
    rot_rad = np.pi * rot / 180
    src_dir = get_dir([0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale * shift
    src[1, :] = center + src_dir + scale * shift
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5], np.float32) + dst_dir
    src[2:, :] = get_3rd_point(src[0, :], src[1, :])
    dst[2:, :] = get_3rd_point(dst[0, :], dst[1, :])
    cv2 = _cv2()
    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def affine_transform(pt, t):
    new_pt = np.array([pt[0], pt[1], 1.], dtype=np.float32).T
    return np.dot(t, new_pt)[:2]


def transform_preds(coords, center, scale, output_size):
    target_coords = np.zeros(coords.shape)
    trans = get_affine_transform(center, scale, 0, output_size, inv=1)
    for p in range(coords.shape[0]):
        target_coords[p, 0:2] = affine_transform(coords[p, 0:2], trans)
    return target_coords


def ctdet_post_process(dets, c, s, h, w, num_classes):
    """CenterNet's ctdet_post_process: per image a dict class (1-based) -> list of [x1, y1, x2, y2, score]."""
    ret = []
    for i in range(dets.shape[0]):
        top_preds = {}
        dets[i, :, :2] = transform_preds(dets[i, :, 0:2], c[i], s[i], (w, h))
        dets[i, :, 2:4] = transform_preds(dets[i, :, 2:4], c[i], s[i], (w, h))
        classes = dets[i, :, -1]
        for j in range(num_classes):
            inds = (classes == j)
            top_preds[j + 1] = np.concatenate([dets[i, inds, :4].astype(np.float32),
                                               dets[i, inds, 4:5].astype(np.float32)], axis=1).tolist()
        ret.append(top_preds)
    return ret


def merge_outputs(detections, num_classes, max_per_image=100):
    """CtdetDetector.merge_outputs for one scale: per class (N, 5) float32, the max_per_image best kept."""
    results = {j: np.concatenate([d[j] for d in detections], axis=0).astype(np.float32)
               for j in range(1, num_classes + 1)}
    scores = np.hstack([results[j][:, 4] for j in range(1, num_classes + 1)])
    if len(scores) > max_per_image:
        kth = len(scores) - max_per_image
        thresh = np.partition(scores, kth)[kth]
        for j in range(1, num_classes + 1):
            results[j] = results[j][results[j][:, 4] >= thresh]
    return results


def generic_post_process(dets, c, s, h, w, out_thresh):
    """CenterTrack's generic_post_process for scores / clses / cts / tracking / bboxes: per image a list of
    {'score', 'class', 'ct', 'tracking', 'bbox'} items, stopping at the first score below out_thresh."""
    ret = []
    for i in range(len(dets["scores"])):
        preds = []
        trans = get_affine_transform(c[i], s[i], 0, (w, h), inv=1).astype(np.float32)
        for j in range(len(dets["scores"][i])):
            if dets["scores"][i][j] < out_thresh:
                break
            item = {"score": dets["scores"][i][j], "class": int(dets["clses"][i][j]) + 1,
                    "ct": transform_preds_with_trans(dets["cts"][i][j].reshape(1, 2), trans).reshape(2)}
            if "tracking" in dets:
                tracking = transform_preds_with_trans((dets["tracking"][i][j] + dets["cts"][i][j]).reshape(1, 2),
                                                      trans).reshape(2)
                item["tracking"] = tracking - item["ct"]
            if "bboxes" in dets:
                item["bbox"] = transform_preds_with_trans(dets["bboxes"][i][j].reshape(2, 2), trans).reshape(4)
            preds.append(item)
        ret.append(preds)
    return ret


def ctdet_post_process_boxes(dets, c, s, h, w):
    """ctdet_post_process's coordinate step (its per-class dict split aside): dets (B, K, 6) numpy float32."""
    dets = dets.copy()
    for i in range(dets.shape[0]):
        dets[i, :, :2] = transform_preds(dets[i, :, 0:2], c[i], s[i], (w, h))
        dets[i, :, 2:4] = transform_preds(dets[i, :, 2:4], c[i], s[i], (w, h))
    return dets


def transform_preds_with_trans(coords, trans):
    target_coords = np.ones((coords.shape[0], 3), np.float32)
    target_coords[:, :2] = coords
    return np.dot(trans, target_coords.transpose()).transpose()[:, :2]


def centernet_pre_process(image, input_h, input_w, down_ratio=4, mean=CENTERNET_MEAN, std=CENTERNET_STD):
    """base_detector.pre_process at scale 1 with fix_res: (1, 3, H, W) float32 numpy and meta."""
    cv2 = _cv2()
    height, width = image.shape[0:2]
    new_height, new_width = int(height), int(width)
    c = np.array([new_width / 2., new_height / 2.], dtype=np.float32)
    s = max(height, width) * 1.0
    trans_input = get_affine_transform(c, s, 0, [input_w, input_h])
    resized_image = cv2.resize(image, (new_width, new_height))
    inp_image = cv2.warpAffine(resized_image, trans_input, (input_w, input_h), flags=cv2.INTER_LINEAR)
    inp_image = ((inp_image / 255. - mean) / std).astype(np.float32)
    images = inp_image.transpose(2, 0, 1).reshape(1, 3, input_h, input_w)
    meta = {"c": c, "s": s, "out_height": input_h // down_ratio, "out_width": input_w // down_ratio}
    return images, meta


def letterbox(img, height=608, width=1088, color=(127.5, 127.5, 127.5)):
    cv2 = _cv2()
    shape = img.shape[:2]
    ratio = min(float(height) / shape[0], float(width) / shape[1])
    new_shape = (round(shape[1] * ratio), round(shape[0] * ratio))
    dw = (width - new_shape[0]) / 2
    dh = (height - new_shape[1]) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.resize(img, new_shape, interpolation=cv2.INTER_AREA)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, ratio, dw, dh


def fairmot_pre_process(img0, height, width, down_ratio=4):
    """LoadImages' letterbox + BGR->RGB + CHW + /255, and the tracker's meta."""
    img, _, _, _ = letterbox(img0, height=height, width=width)
    img = img[:, :, ::-1].transpose(2, 0, 1)
    img = np.ascontiguousarray(img, dtype=np.float32)
    img /= 255.0
    h0, w0 = img0.shape[:2]
    c = np.array([w0 / 2., h0 / 2.], dtype=np.float32)
    s = max(float(width) / float(height) * h0, w0) * 1.0
    meta = {"c": c, "s": s, "out_height": height // down_ratio, "out_width": width // down_ratio}
    return img[None], meta


def fairmot_embeddings(id_feature, inds):
    return _transpose_and_gather_feat(F.normalize(id_feature, dim=1), inds)
