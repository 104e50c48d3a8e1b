#!/usr/bin/env python3
# docs/segmentation.md example panels: python3 tools/seg_panel.py IMAGE.png GT_MASK.png PRED_MASK.png OUT.png
# (standard library only; 8-bit grey or RGB PNGs of one size).
# Composes image | ground truth (green) | prediction (red) panels, upscaled x4, as one PNG.
import struct, sys, zlib

def read_png(path):
    data = open(path, 'rb').read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, idat, w = 8, b'', None
    while pos < len(data):
        n, = struct.unpack('>I', data[pos:pos+4]); typ = data[pos+4:pos+8]; body = data[pos+8:pos+8+n]
        if typ == b'IHDR':
            w, h, depth, ctype = struct.unpack('>IIBB', body[:10])
            assert depth == 8, depth
            ch = {0: 1, 2: 3}[ctype]
        elif typ == b'IDAT':
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat); stride = w * ch; out = []; prev = bytearray(stride); i = 0
    for _ in range(h):
        f = raw[i]; line = bytearray(raw[i+1:i+1+stride]); i += 1 + stride
        for x in range(stride):
            a = line[x-ch] if x >= ch else 0; b = prev[x]; c = prev[x-ch] if x >= ch else 0
            if f == 1: line[x] = (line[x] + a) & 255
            elif f == 2: line[x] = (line[x] + b) & 255
            elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p-a), abs(p-b), abs(p-c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(bytes(line)); prev = line
    return w, h, ch, out

def rgb_at(img, x, y):
    w, h, ch, rows = img
    return tuple(rows[y][x*ch:(x+1)*ch]) if ch == 3 else (rows[y][x],) * 3

def write_png(path, w, h, pix):
    raw = b''.join(b'\x00' + bytes(v for p in pix[y*w:(y+1)*w] for v in p) for y in range(h))
    chunk = lambda t, b: struct.pack('>I', len(b)) + t + b + struct.pack('>I', zlib.crc32(t + b) & 0xffffffff)
    open(path, 'wb').write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
                           + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))

def main():
    image, gt, pred, out = sys.argv[1:5]
    im, g, p = read_png(image), read_png(gt), read_png(pred)
    w, h, S, gap = im[0], im[1], 4, 4
    W = 3 * w * S + 2 * gap
    pix = [(255, 255, 255)] * (W * h * S)
    def blend(c, col, on):
        return tuple(int(v * 0.55 + k * 0.45) for v, k in zip(c, col)) if on else c
    for y in range(h * S):
        for x in range(w * S):
            sx, sy = x // S, y // S
            c = rgb_at(im, sx, sy)
            panels = [c, blend(c, (0, 255, 0), rgb_at(g, sx, sy)[0] > 0), blend(c, (255, 0, 0), rgb_at(p, sx, sy)[0] > 0)]
            for k, v in enumerate(panels):
                pix[y * W + k * (w * S + gap) + x] = v
    write_png(out, W, h * S, pix)


if __name__ == "__main__":
    main()
