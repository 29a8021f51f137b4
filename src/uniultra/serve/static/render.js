// Pixel work of the UniUltra page, kept apart from the UI: window/level, mask overlays with outline,
// mask decoding and an 8-bit gray PNG encoder (label maps must be 1-channel PNGs with values 0..N,
// which canvas.toBlob cannot write: it always writes RGBA).
"use strict";

window.UniUltraRender = (() => {
  // Window/level on 0..255 display values: [lo, lo + width - 1] is stretched to [0, 255].
  // The defaults (level 128, width 256) give lo = 0, hi = 255: the identity, bit-exact.
  function windowLut(level, width) {
    const lut = new Uint8ClampedArray(256);
    const lo = level - width / 2;
    const span = Math.max(width - 1, 1);
    for (let v = 0; v < 256; v += 1) lut[v] = Math.round(((v - lo) * 255) / span);
    return lut;
  }

  function isIdentity(level, width) { return level === 128 && width === 256; }

  // The image's RGBA pixels with the LUT applied (alpha untouched).
  function applyWindow(source, level, width) {
    const out = new ImageData(new Uint8ClampedArray(source.data), source.width, source.height);
    if (isIdentity(level, width)) return out;
    const lut = windowLut(level, width);
    const d = out.data;
    for (let i = 0; i < d.length; i += 4) { d[i] = lut[d[i]]; d[i + 1] = lut[d[i + 1]]; d[i + 2] = lut[d[i + 2]]; }
    return out;
  }

  // A mask pixel on the object's border: inside, with a 4-neighbour outside (or at the image edge).
  function isBorder(mask, w, h, i) {
    const x = i % w;
    const y = (i - x) / w;
    return x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
      !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w];
  }

  // Blend one object's mask into `image` (ImageData): fill at `opacity`, outline opaque. The outline
  // lies on the mask's own border pixels, so the coloured area is exactly the mask.
  function paintMask(image, mask, color, opacity, outline) {
    const d = image.data;
    const { width: w, height: h } = image;
    for (let i = 0; i < mask.length; i += 1) {
      if (!mask[i]) continue;
      const a = outline && isBorder(mask, w, h, i) ? 1 : opacity;
      if (a <= 0) continue;
      const j = 4 * i;
      d[j] = d[j] * (1 - a) + color[0] * a;
      d[j + 1] = d[j + 1] * (1 - a) + color[1] * a;
      d[j + 2] = d[j + 2] * (1 - a) + color[2] * a;
    }
  }

  // Base64 PNG (0 / 255) from the server -> Uint8Array of 0 / 1, one per pixel.
  async function decodeMask(base64Png, width, height) {
    const img = new Image();
    img.src = `data:image/png;base64,${base64Png}`;
    await img.decode();
    const layer = document.createElement("canvas");
    layer.width = width;
    layer.height = height;
    const lctx = layer.getContext("2d");
    lctx.drawImage(img, 0, 0);
    const d = lctx.getImageData(0, 0, width, height).data;
    const mask = new Uint8Array(width * height);
    for (let i = 0; i < mask.length; i += 1) mask[i] = d[4 * i] > 127 ? 1 : 0;
    return mask;
  }

  // --- 8-bit gray PNG ------------------------------------------------------------------------

  const CRC_TABLE = (() => {
    const table = new Uint32Array(256);
    for (let n = 0; n < 256; n += 1) {
      let c = n;
      for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
    return table;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  function chunk(type, data) {
    const out = new Uint8Array(12 + data.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, data.length);
    out.set(new TextEncoder().encode(type), 4);
    out.set(data, 8);
    view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
    return out;
  }

  // Uint8Array of width*height values -> PNG Blob (gray, 8 bits, zlib via CompressionStream).
  async function grayPng(values, width, height) {
    const raw = new Uint8Array((width + 1) * height); // each row: filter byte 0, then the values
    for (let y = 0; y < height; y += 1) raw.set(values.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
    const zlib = new Uint8Array(await new Response(
      new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
    const header = new Uint8Array(13);
    const view = new DataView(header.buffer);
    view.setUint32(0, width);
    view.setUint32(4, height);
    header.set([8, 0, 0, 0, 0], 8); // bit depth 8, colour type 0 (gray), deflate, filter 0, no interlace
    const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
    return new Blob([signature, chunk("IHDR", header), chunk("IDAT", zlib), chunk("IEND", new Uint8Array())],
      { type: "image/png" });
  }

  return { applyWindow, paintMask, decodeMask, grayPng };
})();
