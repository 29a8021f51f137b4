// UniUltra web app: plain JS, no build step. Talks to the JSON API of `uniultra serve`.
// Coordinates sent to the server are IMAGE pixels: the canvas holds the image at its own
// resolution and is scaled by CSS, so every pointer position is mapped through its bounding box.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const stage = $("stage");
  const statusEl = $("status");
  const TAP_SLOP_CSS_PX = 10; // a point-mode press that moves less than this is a tap
  const MIN_BOX_PX = 2; // smaller boxes (in image pixels) are taken as a slip, not a prompt

  const state = {
    id: null, name: "image", width: 0, height: 0, picture: null,
    mode: "box", label: 1, box: null, points: [], history: [],
    drag: null, maskLayer: null, maskUrl: null, seq: 0, pending: false,
    auto: false, modalities: [], autoShown: false, // automatic mode: from /api/health
  };

  // --- status and buttons -----------------------------------------------------------------------

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  function updateButtons() {
    const loaded = state.id !== null;
    $("undo").disabled = !loaded || state.history.length === 0;
    $("clear").disabled = !loaded || (state.box === null && state.points.length === 0);
    $("download").disabled = !loaded || !state.maskUrl || state.pending;
    $("auto").disabled = !loaded || !state.auto;
    $("mode-box").setAttribute("aria-pressed", String(state.mode === "box"));
    $("mode-point").setAttribute("aria-pressed", String(state.mode === "point"));
    $("label-pos").setAttribute("aria-pressed", String(state.label === 1));
    $("label-neg").setAttribute("aria-pressed", String(state.label === 0));
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) {
        return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
      }
    } catch (_) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }

  // --- geometry ---------------------------------------------------------------------------------

  // Client (CSS) coordinates -> continuous image coordinates in [0, width] x [0, height].
  function toImage(event) {
    const rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * (state.width / rect.width);
    const y = (event.clientY - rect.top) * (state.height / rect.height);
    return { x: Math.min(Math.max(x, 0), state.width), y: Math.min(Math.max(y, 0), state.height) };
  }

  // Box corners are pixel edges: rounded to the nearest integer.
  function boxFrom(a, b) {
    return [Math.round(Math.min(a.x, b.x)), Math.round(Math.min(a.y, b.y)),
      Math.round(Math.max(a.x, b.x)), Math.round(Math.max(a.y, b.y))];
  }

  // A point is the pixel under the pointer: its integer (column, row) index.
  function pixelAt(p) {
    return [Math.min(Math.floor(p.x), state.width - 1), Math.min(Math.floor(p.y), state.height - 1)];
  }

  function layout() {
    if (!state.id) return;
    const top = stage.getBoundingClientRect().top + window.scrollY;
    const availW = stage.clientWidth;
    const availH = Math.max(200, window.innerHeight - top - 12);
    const scale = Math.min(availW / state.width, availH / state.height);
    canvas.style.width = `${state.width * scale}px`;
    canvas.style.height = `${state.height * scale}px`;
    redraw();
  }

  // --- drawing ----------------------------------------------------------------------------------

  function redraw() {
    if (!state.picture) return;
    const perCss = state.width / canvas.getBoundingClientRect().width || 1; // image px per CSS px
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(state.picture, 0, 0);
    if (state.maskLayer) ctx.drawImage(state.maskLayer, 0, 0);
    const preview = state.drag && state.mode === "box" ? boxFrom(state.drag.start, state.drag.current) : null;
    for (const [box, dashed] of [[state.box, false], [preview, true]]) {
      if (!box) continue;
      ctx.save();
      ctx.lineWidth = 2 * perCss;
      ctx.strokeStyle = "#ffd24a";
      if (dashed) ctx.setLineDash([6 * perCss, 4 * perCss]);
      ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
      ctx.restore();
    }
    for (const p of state.points) {
      ctx.beginPath();
      ctx.arc(p.x + 0.5, p.y + 0.5, 7 * perCss, 0, 2 * Math.PI);
      ctx.fillStyle = p.label === 1 ? "#3ddc68" : "#ff4d4d";
      ctx.fill();
      ctx.lineWidth = 2 * perCss;
      ctx.strokeStyle = "#ffffff";
      ctx.stroke();
    }
  }

  async function setMask(base64Png) {
    const img = new Image();
    img.src = `data:image/png;base64,${base64Png}`;
    await img.decode();
    const layer = document.createElement("canvas");
    layer.width = state.width;
    layer.height = state.height;
    const lctx = layer.getContext("2d");
    lctx.drawImage(img, 0, 0);
    const pixels = lctx.getImageData(0, 0, layer.width, layer.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const inside = d[i] > 127;
      d[i] = 43; d[i + 1] = 179; d[i + 2] = 255; d[i + 3] = inside ? 115 : 0;
    }
    lctx.putImageData(pixels, 0, 0);
    return layer;
  }

  // --- prompts ----------------------------------------------------------------------------------

  function snapshot() {
    return { box: state.box ? [...state.box] : null, points: state.points.map((p) => ({ ...p })) };
  }

  function change(mutate) {
    state.history.push(snapshot());
    mutate();
    promptsChanged();
  }

  function promptsChanged() {
    state.autoShown = false;
    updateButtons();
    redraw();
    requestMask();
  }

  function requestMask() {
    if (!state.box && state.points.length === 0) {
      state.seq += 1; // a mask still on its way is for prompts that are gone
      state.maskLayer = null;
      state.maskUrl = null;
      state.pending = false;
      updateButtons();
      redraw();
      setStatus(state.auto ? "No prompt: drag a box, tap points or press Auto." : "No prompt: drag a box or tap points.");
      return;
    }
    const body = {
      box: state.box,
      points: state.points.map((p) => [p.x, p.y]),
      labels: state.points.map((p) => p.label),
      multimask: false,
    };
    fetchMask("predict", body, (result) => `Mask ready: ${result.foreground_pixels} pixels, predicted IoU ` +
      `${result.score.toFixed(2)} (${Math.round(result.decode_ms)} ms).`);
  }

  // The automatic mode needs no prompt: the current ones are put aside (Undo brings them back).
  function requestAutoMask() {
    if (!state.id || !state.auto) return;
    if (state.box !== null || state.points.length) state.history.push(snapshot());
    state.box = null;
    state.points = [];
    state.autoShown = true;
    redraw();
    const modality = state.modalities.length > 1 ? $("modality").value : null;
    fetchMask("auto", { modality }, (result) => `Automatic mask${modality ? ` (${modality})` : ""}: ` +
      `${result.foreground_pixels} pixels, target present with probability ${result.score.toFixed(2)} ` +
      `(${Math.round(result.decode_ms)} ms).`);
  }

  // POST to /api/images/{id}/{endpoint}; only the latest request's mask is shown.
  async function fetchMask(endpoint, body, describe) {
    const seq = ++state.seq;
    state.pending = true;
    updateButtons();
    setStatus("Segmenting…");
    try {
      const response = await fetch(`/api/images/${encodeURIComponent(state.id)}/${endpoint}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (seq !== state.seq) return; // a newer prompt is on its way
      if (!response.ok) {
        state.pending = false;
        updateButtons();
        const detail = await errorText(response);
        setStatus(response.status === 404 ? `${detail} — open the image again.` : `Cannot segment: ${detail}`, true);
        return;
      }
      const result = await response.json();
      const layer = await setMask(result.mask_png_base64);
      if (seq !== state.seq) return;
      state.maskLayer = layer;
      state.maskUrl = result.mask_url;
      state.pending = false;
      updateButtons();
      redraw();
      setStatus(describe(result));
    } catch (err) {
      if (seq !== state.seq) return;
      state.pending = false;
      updateButtons();
      setStatus(`Cannot reach the server: ${err.message}`, true);
    }
  }

  // --- pointer input (mouse, touch and pen alike) -----------------------------------------------

  canvas.addEventListener("pointerdown", (event) => {
    if (!state.id || !event.isPrimary || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    const p = toImage(event);
    state.drag = { pointerId: event.pointerId, start: p, current: p, x0: event.clientX, y0: event.clientY };
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!state.drag || event.pointerId !== state.drag.pointerId) return;
    state.drag.current = toImage(event);
    if (state.mode === "box") redraw();
  });

  canvas.addEventListener("pointerup", (event) => {
    const drag = state.drag;
    if (!drag || event.pointerId !== drag.pointerId) return;
    state.drag = null;
    drag.current = toImage(event);
    if (state.mode === "box") {
      const box = boxFrom(drag.start, drag.current);
      if (box[2] - box[0] >= MIN_BOX_PX && box[3] - box[1] >= MIN_BOX_PX) {
        change(() => { state.box = box; });
      } else {
        redraw();
        setStatus("Drag to draw a box (or switch to point mode to tap points).");
      }
    } else if (Math.hypot(event.clientX - drag.x0, event.clientY - drag.y0) <= TAP_SLOP_CSS_PX) {
      const [x, y] = pixelAt(drag.current);
      change(() => { state.points.push({ x, y, label: state.label }); });
    }
  });

  canvas.addEventListener("pointercancel", () => { state.drag = null; redraw(); });

  // --- opening images ---------------------------------------------------------------------------

  async function openFile(file) {
    if (!file) return;
    setStatus(`Uploading ${file.name} and computing its embedding…`);
    const form = new FormData();
    form.append("file", file, file.name);
    let info;
    try {
      const response = await fetch("/api/images", { method: "POST", body: form });
      if (!response.ok) {
        setStatus(`Cannot open ${file.name}: ${await errorText(response)}`, true);
        return;
      }
      info = await response.json();
      const picture = new Image();
      picture.src = info.image_url;
      await picture.decode();
      state.picture = picture;
    } catch (err) {
      setStatus(`Cannot open ${file.name}: ${err.message}`, true);
      return;
    }
    Object.assign(state, {
      id: info.id, name: file.name.replace(/\.[^.]*$/, "") || "image", width: info.width, height: info.height,
      box: null, points: [], history: [], drag: null, maskLayer: null, maskUrl: null, pending: false,
      autoShown: false,
    });
    state.seq += 1;
    canvas.width = info.width;
    canvas.height = info.height;
    stage.classList.remove("empty");
    layout();
    updateButtons();
    setStatus(`${file.name}: ${info.width} × ${info.height} pixels, ready (${Math.round(info.encode_ms)} ms). ` +
      (state.mode === "box" ? "Drag a box around the structure" : "Tap the structure") +
      (state.auto ? " or press Auto." : "."));
  }

  $("file").addEventListener("change", (event) => {
    openFile(event.target.files[0]);
    event.target.value = ""; // the same file can be opened again
  });
  stage.addEventListener("dragover", (event) => { event.preventDefault(); stage.classList.add("dragover"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
  stage.addEventListener("drop", (event) => {
    event.preventDefault();
    stage.classList.remove("dragover");
    openFile(event.dataTransfer.files[0]);
  });

  // --- buttons and keys -------------------------------------------------------------------------

  function setMode(mode) { state.mode = mode; updateButtons(); }
  function setLabel(label) { state.label = label; state.mode = "point"; updateButtons(); }

  function undo() {
    if (!state.history.length) return;
    Object.assign(state, state.history.pop());
    promptsChanged();
  }

  function clearPrompts() {
    if (state.box === null && state.points.length === 0) return;
    change(() => { state.box = null; state.points = []; });
  }

  function download() {
    if (!state.maskUrl) return;
    const link = document.createElement("a");
    link.href = state.maskUrl;
    link.download = `${state.name}-mask.png`;
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  $("mode-box").addEventListener("click", () => setMode("box"));
  $("mode-point").addEventListener("click", () => setMode("point"));
  $("label-pos").addEventListener("click", () => setLabel(1));
  $("label-neg").addEventListener("click", () => setLabel(0));
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearPrompts);
  $("download").addEventListener("click", download);
  $("auto").addEventListener("click", requestAutoMask);
  $("modality").addEventListener("change", () => { if (state.autoShown) requestAutoMask(); });
  window.addEventListener("resize", layout);
  window.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") { event.preventDefault(); undo(); }
    else if (event.key === "b") setMode("box");
    else if (event.key === "p") setMode("point");
    else if (event.key === "+") setLabel(1);
    else if (event.key === "-") setLabel(0);
    else if (event.key === "a") requestAutoMask();
  });

  // The Auto button (and a modality choice when there are several) only for a model with that head.
  async function loadModelInfo() {
    try {
      const response = await fetch("/api/health");
      if (!response.ok) return;
      const health = await response.json();
      state.auto = Boolean(health.auto);
      state.modalities = health.modalities || [];
    } catch (_) { return; } // the upload will report an unreachable server
    $("auto").hidden = !state.auto;
    const select = $("modality");
    select.replaceChildren(...state.modalities.map((name) => new Option(name, name)));
    select.hidden = !state.auto || state.modalities.length < 2;
    updateButtons();
  }

  updateButtons();
  loadModelInfo();
})();
