// UniUltra web app: plain JS, no build step. Talks to the JSON API of `uniultra serve`.
// Coordinates sent to the server are IMAGE pixels: the canvas holds the image at its own
// resolution and is scaled (and zoomed / panned) by CSS, so every pointer position is mapped through its
// bounding box. Pixel work (window/level, overlays, PNG encoding) is in render.js.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("view");
  const ctx = canvas.getContext("2d");
  const stage = $("stage");
  const statusEl = $("status");
  const TAP_SLOP_CSS_PX = 10; // a point-mode press that moves less than this is a tap
  const MIN_BOX_PX = 2; // smaller boxes (in image pixels) are taken as a slip, not a prompt

  const R = window.UniUltraRender;
  const MAX_ZOOM = 16;
  // Object colours; the first is the page's historical overlay blue.
  const PALETTE = [[43, 179, 255], [255, 140, 40], [80, 220, 120], [230, 80, 200], [255, 225, 60],
    [150, 120, 255], [255, 90, 90], [60, 220, 220]];

  // Each object keeps, per frame, its own prompts, undo history and mask: `obj.frames[frame]`.
  const state = {
    id: null, name: "image", width: 0, height: 0, format: "png", imageUrl: null, frames: 1, frame: 0,
    pixels: null, composite: null, // the frame's RGBA pixels, and them with W/L and masks painted in
    objects: [], active: -1, nextKey: 1,
    mode: "box", label: 1, drag: null, pan: null, pinch: null, pointers: new Map(), pending: 0,
    view: { zoom: 1, x: 0, y: 0 }, // CSS transform of the canvas: translate(x, y) scale(zoom)
    auto: false, modalities: [], locatesTaps: false, gate: 0, // automatic mode: from /api/health
  };

  // --- status and buttons -----------------------------------------------------------------------

  function setStatus(text, isError = false) {
    statusEl.textContent = text;
    statusEl.classList.toggle("error", isError);
  }

  function activeObject() { return state.objects[state.active] || null; }

  function emptySlot() { return { box: null, points: [], history: [], mask: null, b64: null, result: null, seq: 0 }; }

  function slot(obj = activeObject(), frame = state.frame) {
    if (!obj.frames[frame]) obj.frames[frame] = emptySlot();
    return obj.frames[frame];
  }

  function hasPrompts(s) { return Boolean(s && (s.box || s.points.length)); }

  // Objects with a mask on the shown frame, with their label value (position in the list, from 1).
  function masksShown() {
    return state.objects.map((obj, i) => ({ obj, value: i + 1, s: obj.frames[state.frame] }))
      .filter((entry) => entry.s && entry.s.mask);
  }

  function updateButtons() {
    const loaded = state.id !== null;
    const s = loaded && activeObject() ? activeObject().frames[state.frame] : null;
    const canSave = loaded && masksShown().length > 0 && state.pending === 0;
    $("undo").disabled = !s || s.history.length === 0;
    $("clear").disabled = !hasPrompts(s);
    $("download").disabled = !canSave;
    $("download-json").disabled = !canSave;
    $("download-seg").hidden = state.format !== "dicom" || state.frames > 1;
    $("download-seg").disabled = !canSave;
    $("propagate").hidden = state.frames < 2;
    $("propagate").disabled = !hasPrompts(s) || state.pending > 0;
    $("auto").disabled = !loaded || !state.auto;
    $("add-object").disabled = !loaded;
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
    stage.style.height = `${state.height * scale}px`; // the zoomed canvas is clipped to this box
    applyView();
  }

  // --- zoom and pan: a CSS transform of the canvas. Pointer positions still go through the
  // canvas's bounding box (toImage), which includes the transform, so prompts stay in image pixels.

  function applyView() {
    const v = state.view;
    const w = parseFloat(canvas.style.width) || 0;
    const h = parseFloat(canvas.style.height) || 0;
    v.x = Math.min(0, Math.max(v.x, w * (1 - v.zoom))); // the image always covers its box
    v.y = Math.min(0, Math.max(v.y, h * (1 - v.zoom)));
    canvas.style.transform = `translate(${v.x}px, ${v.y}px) scale(${v.zoom})`;
    redraw();
  }

  // Client position of the untransformed canvas's top-left corner.
  function canvasOrigin() {
    const r = stage.getBoundingClientRect();
    return { x: r.left + canvas.offsetLeft, y: r.top + canvas.offsetTop };
  }

  // Zoom to `zoom`, keeping the image point under client (cx, cy) where it is.
  function zoomAt(zoom, cx, cy) {
    const v = state.view;
    const o = canvasOrigin();
    const ux = (cx - o.x - v.x) / v.zoom;
    const uy = (cy - o.y - v.y) / v.zoom;
    v.zoom = Math.min(Math.max(zoom, 1), MAX_ZOOM);
    v.x = cx - o.x - ux * v.zoom;
    v.y = cy - o.y - uy * v.zoom;
    applyView();
  }

  function zoomBy(factor) {
    const r = stage.getBoundingClientRect();
    zoomAt(state.view.zoom * factor, r.left + r.width / 2, r.top + r.height / 2);
  }

  function resetView() { state.view = { zoom: 1, x: 0, y: 0 }; applyView(); }

  // The frame with window/level and every object's mask, into the offscreen `composite`; then redraw.
  function compose() {
    if (!state.pixels) return;
    const image = R.applyWindow(state.pixels, Number($("wl-level").value), Number($("wl-width").value));
    const opacity = Number($("opacity").value) / 100;
    const outline = $("outline").checked;
    for (const { obj, s } of masksShown()) R.paintMask(image, s.mask, obj.color, opacity, outline);
    state.composite.getContext("2d").putImageData(image, 0, 0);
    redraw();
  }

  function rgb(color) { return `rgb(${color.join(",")})`; }

  function strokeBox(box, color, dashed, perCss) {
    ctx.save();
    ctx.lineWidth = 2 * perCss;
    ctx.strokeStyle = color;
    if (dashed) ctx.setLineDash([6 * perCss, 4 * perCss]);
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.restore();
  }

  function drawPoint(p, ring, perCss) {
    ctx.beginPath();
    ctx.arc(p.x + 0.5, p.y + 0.5, 7 * perCss, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? "#3ddc68" : "#ff4d4d";
    ctx.fill();
    ctx.lineWidth = 2 * perCss;
    ctx.strokeStyle = ring;
    ctx.stroke();
  }

  // The active object's prompts in yellow / white, the others' in their own colour.
  function redraw() {
    if (!state.composite) return;
    const perCss = state.width / canvas.getBoundingClientRect().width || 1; // image px per CSS px
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(state.composite, 0, 0);
    state.objects.forEach((obj, i) => {
      const s = obj.frames[state.frame];
      if (!s) return;
      const active = i === state.active;
      if (s.box) strokeBox(s.box, active ? "#ffd24a" : rgb(obj.color), false, perCss);
      for (const p of s.points) drawPoint(p, active ? "#ffffff" : rgb(obj.color), perCss);
    });
    if (state.drag && state.mode === "box") strokeBox(boxFrom(state.drag.start, state.drag.current), "#ffd24a", true, perCss);
  }

  // --- objects ----------------------------------------------------------------------------------

  function addObject() {
    const key = state.nextKey++;
    state.objects.push({ key, name: `object ${key}`, color: PALETTE[(key - 1) % PALETTE.length], frames: {} });
    selectObject(state.objects.length - 1);
  }

  function selectObject(index) {
    if (index < 0 || index >= state.objects.length) return;
    state.active = index;
    renderObjects();
    updateButtons();
    redraw();
  }

  // Deleting the last object leaves a fresh empty one: there is always an object to prompt.
  function deleteObject(index = state.active) {
    if (!state.id || index < 0) return;
    state.objects.splice(index, 1);
    if (!state.objects.length) addObject();
    selectObject(Math.min(index, state.objects.length - 1));
    compose();
  }

  function fmt(value) { return value.toFixed(1); }

  function measureText(s) {
    if (!s || !s.result) return hasPrompts(s) ? "segmenting…" : "no prompt on this frame";
    const r = s.result;
    if (!r.foreground_pixels) return "nothing found";
    if (!r.measurements) return `${r.foreground_pixels} px (enter a spacing for mm)`;
    return r.measurements.map((m) => `${fmt(m.area_mm2)} mm², ${fmt(m.longest_diameter_mm)} × ` +
      `${fmt(m.orthogonal_diameter_mm)} mm, perimeter ${fmt(m.perimeter_mm)} mm`).join("; ");
  }

  function objectRow(obj, index) {
    const li = document.createElement("li");
    li.classList.toggle("active", index === state.active);
    const select = document.createElement("button");
    select.type = "button";
    select.className = "swatch";
    select.style.background = rgb(obj.color);
    select.setAttribute("aria-label", `Select object ${index + 1}`);
    select.setAttribute("aria-pressed", String(index === state.active));
    select.textContent = String(index + 1);
    select.addEventListener("click", () => selectObject(index));
    const name = document.createElement("input");
    name.value = obj.name;
    name.setAttribute("aria-label", `Name of object ${index + 1}`);
    name.addEventListener("focus", () => { // no re-render here: it would take the focus away
      state.active = index;
      markActive();
      updateButtons();
      redraw();
    });
    name.addEventListener("input", () => { obj.name = name.value; });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Delete object ${index + 1}`);
    remove.addEventListener("click", () => deleteObject(index));
    const measure = document.createElement("p");
    measure.className = "measure";
    measure.textContent = measureText(obj.frames[state.frame]);
    li.append(select, name, remove, measure);
    return li;
  }

  function markActive() {
    [...$("objects").children].forEach((li, i) => {
      li.classList.toggle("active", i === state.active);
      li.querySelector(".swatch").setAttribute("aria-pressed", String(i === state.active));
    });
  }

  function renderObjects() { $("objects").replaceChildren(...state.objects.map(objectRow)); }

  // --- prompts (of the active object on the shown frame) ----------------------------------------

  function snapshot(s) {
    return { box: s.box ? [...s.box] : null, points: s.points.map((p) => ({ ...p })) };
  }

  function change(mutate) {
    const s = slot();
    s.history.push(snapshot(s));
    mutate(s);
    s.autoShown = false; // the prompts, not the automatic mode, now make the mask (and the menu's meaning)
    promptsChanged();
  }

  function promptsChanged() {
    updateButtons();
    redraw();
    requestMask();
  }

  // Fields every segmentation request carries: the spacing typed in (else the server uses the
  // DICOM's) and, for a cine loop, the frame.
  function common() {
    const body = {};
    const spacing = Number($("spacing").value);
    if ($("spacing").value !== "" && spacing > 0) body.spacing = [spacing];
    if (state.frames > 1) body.frame = state.frame;
    return body;
  }

  function promptBody(s) {
    const body = { box: s.box, points: s.points.map((p) => [p.x, p.y]), labels: s.points.map((p) => p.label), ...common() };
    // A tap (points only): the chosen channel of the automatic head locates the object, when the model can.
    // "Not named" (the empty value): the crops and the regions answer, as for anatomy the head was not trained on.
    if (isTap(s) && state.locatesTaps && $("modality").value) body.modality = $("modality").value;
    return body;
  }

  function isTap(s) {
    return !s.box && s.points.some((p) => p.label === 1);
  }

  function requestMask(obj = activeObject()) {
    const s = slot(obj);
    if (!hasPrompts(s)) {
      s.seq += 1; // a mask still on its way is for prompts that are gone
      Object.assign(s, { mask: null, b64: null, result: null });
      masksChanged();
      setStatus(state.auto ? "No prompt: drag a box, tap points or press Auto." : "No prompt: drag a box or tap points.");
      return;
    }
    fetchMask(obj, "predict", { ...promptBody(s), multimask: false }, (result) => `Mask ready (${obj.name}): ` +
      `${result.foreground_pixels} pixels, predicted IoU ${result.score.toFixed(2)} (${Math.round(result.decode_ms)} ms).`);
  }

  // The automatic mode needs no prompt: the current ones are put aside (Undo brings them back).
  function requestAutoMask() {
    if (!state.id || !state.auto) return;
    if (state.modalities.length > 1 && !$("modality").value) {
      setStatus("Auto needs the anatomy: choose it in the Anatomy menu.");
      return;
    }
    const obj = activeObject();
    const s = slot(obj);
    if (hasPrompts(s)) s.history.push(snapshot(s));
    s.box = null;
    s.points = [];
    s.autoShown = true;
    redraw();
    const modality = state.modalities.length > 1 ? $("modality").value : null;
    const gate = Number($("gate").value);
    // Untouched, the slider asks for the model's own gate (an older export accepts no other).
    const presenceGate = gate === state.gate ? "calibrated" : gate;
    fetchMask(obj, "auto", { modality, presence_gate: presenceGate, ...common() }, (result) =>
      `Automatic mask${modality ? ` (${modality})` : ""}: ${result.foreground_pixels} pixels, target present ` +
      `with probability ${result.score.toFixed(2)}` +
      (result.presence_gate !== null && result.score < result.presence_gate ?
        ` (below the gate ${result.presence_gate.toFixed(2)}: nothing here)` : "") +
      ` (${Math.round(result.decode_ms)} ms).`);
  }

  function showGate() {
    $("gate-value").textContent = Number($("gate").value).toFixed(2);
  }

  function masksChanged() {
    renderObjects();
    updateButtons();
    compose();
  }

  // POST to /api/images/{id}/{endpoint}; per object and frame, only the latest request's mask is kept.
  async function fetchMask(obj, endpoint, body, describe) {
    const id = state.id;
    const s = slot(obj);
    const seq = ++s.seq;
    state.pending += 1;
    updateButtons();
    setStatus("Segmenting…");
    try {
      const response = await fetch(`/api/images/${encodeURIComponent(id)}/${endpoint}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (seq !== s.seq || id !== state.id) return; // a newer prompt is on its way
      if (!response.ok) {
        const detail = await errorText(response);
        setStatus(response.status === 404 ? `${detail} — open the image again.` : `Cannot segment: ${detail}`, true);
        return;
      }
      const result = await response.json();
      const mask = await R.decodeMask(result.mask_png_base64, state.width, state.height);
      if (seq !== s.seq || id !== state.id) return;
      Object.assign(s, { mask, b64: result.mask_png_base64, result });
      masksChanged();
      setStatus(describe(result));
    } catch (err) {
      if (seq === s.seq) setStatus(`Cannot reach the server: ${err.message}`, true);
    } finally {
      state.pending -= 1;
      updateButtons();
    }
  }

  // Re-measure every object of the shown frame (after a spacing change): decoder only, fast.
  function remeasure() {
    for (const obj of state.objects) if (hasPrompts(obj.frames[state.frame])) requestMask(obj);
  }

  // --- cine loops -------------------------------------------------------------------------------

  async function propagateLoop() {
    const obj = activeObject();
    const s = obj && obj.frames[state.frame];
    if (state.frames < 2 || !hasPrompts(s) || state.pending) return;
    const id = state.id;
    const start = state.frame;
    state.pending += 1;
    updateButtons();
    setStatus(`Propagating ${obj.name} through ${state.frames} frames…`);
    try {
      const response = await fetch(`/api/images/${encodeURIComponent(id)}/propagate`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(promptBody(s)),
      });
      if (id !== state.id) return;
      if (!response.ok) { setStatus(`Cannot propagate: ${await errorText(response)}`, true); return; }
      const result = await response.json();
      for (const f of result.frames) await storeFrameMask(obj, f, f.frame !== start, result.pixel_spacing_mm);
      if (id !== state.id) return;
      masksChanged();
      setStatus(`Propagated ${obj.name} through ${result.frames.length} frames (${Math.round(result.decode_ms)} ms). ` +
        "Move the frame slider to check each frame.");
    } catch (err) {
      setStatus(`Cannot reach the server: ${err.message}`, true);
    } finally {
      state.pending -= 1;
      updateButtons();
    }
  }

  // A propagated frame's own prompts are replaced by the propagation (Undo brings them back).
  async function storeFrameMask(obj, f, propagated, spacing) {
    const t = slot(obj, f.frame);
    t.seq += 1;
    if (propagated && hasPrompts(t)) t.history.push(snapshot(t));
    if (propagated) { t.box = null; t.points = []; }
    const mask = await R.decodeMask(f.mask_png_base64, state.width, state.height);
    Object.assign(t, { mask, b64: f.mask_png_base64, result: { ...f, pixel_spacing_mm: spacing }, propagated });
  }

  async function loadPicture(url) {
    const picture = new Image();
    picture.src = url;
    await picture.decode();
    const layer = document.createElement("canvas");
    layer.width = picture.naturalWidth;
    layer.height = picture.naturalHeight;
    const lctx = layer.getContext("2d");
    lctx.drawImage(picture, 0, 0);
    return lctx.getImageData(0, 0, layer.width, layer.height);
  }

  async function showFrame(frame) {
    if (!state.id || state.frames < 2) return;
    frame = Math.min(Math.max(frame, 0), state.frames - 1);
    if (frame === state.frame) return;
    const id = state.id;
    state.frame = frame;
    $("frame").value = String(frame);
    $("frame-label").textContent = `${frame + 1} / ${state.frames}`;
    try {
      const pixels = await loadPicture(`${state.imageUrl}?frame=${frame}`);
      if (id !== state.id || frame !== state.frame) return;
      state.pixels = pixels;
    } catch (err) {
      setStatus(`Cannot show frame ${frame + 1}: ${err.message}`, true);
      return;
    }
    masksChanged();
    setStatus(`Frame ${frame + 1} of ${state.frames}.`);
  }

  // --- pointer input (mouse, touch and pen alike) -----------------------------------------------
  // One pointer prompts (box drag or tap); Shift-drag or the middle button pans; two touches pinch.

  function startPinch() {
    const [a, b] = [...state.pointers.values()];
    const o = canvasOrigin();
    const mid = { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
    const v = state.view;
    state.drag = null; // the first finger was not a prompt after all
    state.pinch = { d0: Math.hypot(a.x - b.x, a.y - b.y) || 1, zoom0: v.zoom,
      ux: (mid.x - o.x - v.x) / v.zoom, uy: (mid.y - o.y - v.y) / v.zoom };
    redraw();
  }

  function movePinch() {
    const [a, b] = [...state.pointers.values()];
    const p = state.pinch;
    const o = canvasOrigin();
    const v = state.view;
    v.zoom = Math.min(Math.max(p.zoom0 * Math.hypot(a.x - b.x, a.y - b.y) / p.d0, 1), MAX_ZOOM);
    v.x = (a.x + b.x) / 2 - o.x - p.ux * v.zoom; // the image point under the fingers' midpoint stays there
    v.y = (a.y + b.y) / 2 - o.y - p.uy * v.zoom;
    applyView();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (!state.id) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    state.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    if (event.pointerType === "touch" && state.pointers.size === 2) { startPinch(); return; }
    if (state.pointers.size > 1) return;
    if (event.pointerType === "mouse" && (event.button === 1 || (event.button === 0 && event.shiftKey))) {
      state.pan = { pointerId: event.pointerId, x0: event.clientX, y0: event.clientY, vx: state.view.x, vy: state.view.y };
      return;
    }
    if (!event.isPrimary || (event.pointerType === "mouse" && event.button !== 0)) return;
    const p = toImage(event);
    state.drag = { pointerId: event.pointerId, start: p, current: p, x0: event.clientX, y0: event.clientY };
  });

  canvas.addEventListener("pointermove", (event) => {
    if (state.pointers.has(event.pointerId)) state.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    if (state.pinch && state.pointers.size >= 2) { movePinch(); return; }
    if (state.pan && event.pointerId === state.pan.pointerId) {
      state.view.x = state.pan.vx + event.clientX - state.pan.x0;
      state.view.y = state.pan.vy + event.clientY - state.pan.y0;
      applyView();
      return;
    }
    if (!state.drag || event.pointerId !== state.drag.pointerId) return;
    state.drag.current = toImage(event);
    if (state.mode === "box") redraw();
  });

  function endPointer(event) {
    state.pointers.delete(event.pointerId);
    if (state.pinch && state.pointers.size < 2) state.pinch = null;
    if (state.pan && event.pointerId === state.pan.pointerId) state.pan = null;
  }

  canvas.addEventListener("pointerup", (event) => {
    endPointer(event);
    const drag = state.drag;
    if (!drag || event.pointerId !== drag.pointerId) return;
    state.drag = null;
    drag.current = toImage(event);
    if (state.mode === "box") {
      const box = boxFrom(drag.start, drag.current);
      if (box[2] - box[0] >= MIN_BOX_PX && box[3] - box[1] >= MIN_BOX_PX) {
        change((s) => { s.box = box; });
      } else {
        redraw();
        setStatus("Drag to draw a box (or switch to point mode to tap points).");
      }
    } else if (Math.hypot(event.clientX - drag.x0, event.clientY - drag.y0) <= TAP_SLOP_CSS_PX) {
      const [x, y] = pixelAt(drag.current);
      change((s) => { s.points.push({ x, y, label: state.label }); });
    }
  });

  canvas.addEventListener("pointercancel", (event) => { endPointer(event); state.drag = null; redraw(); });

  stage.addEventListener("wheel", (event) => {
    if (!state.id) return;
    event.preventDefault(); // the page must not scroll while zooming
    zoomAt(state.view.zoom * Math.exp(-event.deltaY * 0.002), event.clientX, event.clientY);
  }, { passive: false });

  // --- opening images ---------------------------------------------------------------------------

  async function openFile(file) {
    if (!file) return;
    setStatus(`Uploading ${file.name} and computing its embedding…`);
    const form = new FormData();
    form.append("file", file, file.name);
    let info;
    let pixels;
    try {
      const response = await fetch("/api/images", { method: "POST", body: form });
      if (!response.ok) {
        setStatus(`Cannot open ${file.name}: ${await errorText(response)}`, true);
        return;
      }
      info = await response.json();
      pixels = await loadPicture(info.image_url);
    } catch (err) {
      setStatus(`Cannot open ${file.name}: ${err.message}`, true);
      return;
    }
    startImage(info, file.name, pixels);
    const frames = info.frames > 1 ? `, ${info.frames} frames` : "";
    setStatus(`${file.name}: ${info.width} × ${info.height} pixels${frames}, ready (${Math.round(info.encode_ms)} ms). ` +
      (state.mode === "box" ? "Drag a box around the structure" : "Tap the structure") +
      (state.auto ? " or press Auto." : "."));
  }

  function startImage(info, fileName, pixels) {
    Object.assign(state, {
      id: info.id, name: fileName.replace(/\.[^.]*$/, "") || "image", width: info.width, height: info.height,
      format: info.format, imageUrl: info.image_url, frames: info.frames || 1, frame: 0, pixels,
      objects: [], active: -1, nextKey: 1, drag: null, pan: null, pinch: null, view: { zoom: 1, x: 0, y: 0 },
    });
    state.pointers.clear();
    state.composite = document.createElement("canvas");
    state.composite.width = canvas.width = info.width;
    state.composite.height = canvas.height = info.height;
    $("spacing").value = ""; // a spacing typed for the previous image would mis-measure this one
    const dicomSpacing = info.pixel_spacing_mm;
    $("spacing").placeholder = dicomSpacing ? `DICOM ${dicomSpacing.map((v) => +v.toFixed(4)).join(" × ")}` : "mm/px";
    $("frame-box").hidden = state.frames < 2;
    $("frame").max = String(state.frames - 1);
    $("frame").value = "0";
    $("frame-label").textContent = `1 / ${state.frames}`;
    stage.classList.remove("empty");
    addObject();
    layout();
    compose();
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
    const s = state.id && activeObject() ? activeObject().frames[state.frame] : null;
    if (!s || !s.history.length) return;
    Object.assign(s, s.history.pop());
    promptsChanged();
  }

  function clearPrompts() {
    if (!state.id || !hasPrompts(activeObject().frames[state.frame])) return;
    change((s) => { s.box = null; s.points = []; });
  }

  function saveBlob(blob, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  }

  function fileStem() { return state.frames > 1 ? `${state.name}_frame${state.frame}` : state.name; }

  // Value k where object k (its place in the list) is; a later object wins where two overlap.
  function labelMap() {
    const values = new Uint8Array(state.width * state.height);
    for (const { s, value } of masksShown()) for (let i = 0; i < values.length; i += 1) if (s.mask[i]) values[i] = value;
    return values;
  }

  // What the page shows: one object -> its 0/255 mask PNG; several -> a label map PNG (0..N).
  async function download() {
    const shown = masksShown();
    if (!shown.length) return;
    const blob = state.objects.length === 1
      ? new Blob([Uint8Array.from(atob(shown[0].s.b64), (c) => c.charCodeAt(0))], { type: "image/png" })
      : await R.grayPng(labelMap(), state.width, state.height);
    saveBlob(blob, `${fileStem()}_mask.png`);
  }

  function labelsJson() {
    const shown = masksShown();
    return {
      image: state.name, width: state.width, height: state.height, frames: state.frames,
      frame: state.frames > 1 ? state.frame : null, mask_file: `${fileStem()}_mask.png`,
      mask_values: state.objects.length === 1 ? "0 = background, 255 = object" : "0 = background, k = object k",
      pixel_spacing_mm: shown.length ? shown[0].s.result.pixel_spacing_mm ?? null : null,
      objects: state.objects.map((obj, i) => {
        const s = obj.frames[state.frame];
        const r = s && s.result;
        return { value: i + 1, name: obj.name, color: obj.color, box: s ? s.box : null,
          points: s ? s.points.map((p) => [p.x, p.y]) : [], labels: s ? s.points.map((p) => p.label) : [],
          propagated: Boolean(s && s.propagated), pixels: r ? r.foreground_pixels : 0, score: r ? r.score : null,
          measurements: r ? r.measurements ?? null : null };
      }),
    };
  }

  function downloadJson() {
    if (!masksShown().length) return;
    saveBlob(new Blob([JSON.stringify(labelsJson(), null, 1)], { type: "application/json" }), `${fileStem()}_mask.json`);
  }

  async function downloadSeg() {
    if (!masksShown().length) return;
    const form = new FormData();
    form.append("labelmap", await R.grayPng(labelMap(), state.width, state.height), "labels.png");
    form.append("labels", JSON.stringify(state.objects.map((obj) => obj.name)));
    try {
      const response = await fetch(`/api/images/${encodeURIComponent(state.id)}/seg.dcm`, { method: "POST", body: form });
      if (!response.ok) { setStatus(`Cannot export DICOM SEG: ${await errorText(response)}`, true); return; }
      saveBlob(await response.blob(), `${state.name}_seg.dcm`);
      setStatus(`DICOM SEG saved as ${state.name}_seg.dcm (${state.objects.length} segment(s)).`);
    } catch (err) {
      setStatus(`Cannot reach the server: ${err.message}`, true);
    }
  }

  function resetWindow() { $("wl-level").value = "128"; $("wl-width").value = "256"; compose(); }

  function toggleOutline() { $("outline").checked = !$("outline").checked; compose(); }

  function toggleHelp() {
    const help = $("help");
    help.hidden = !help.hidden;
    $("help-toggle").setAttribute("aria-expanded", String(!help.hidden));
  }

  $("mode-box").addEventListener("click", () => setMode("box"));
  $("mode-point").addEventListener("click", () => setMode("point"));
  $("label-pos").addEventListener("click", () => setLabel(1));
  $("label-neg").addEventListener("click", () => setLabel(0));
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearPrompts);
  $("download").addEventListener("click", download);
  $("download-json").addEventListener("click", downloadJson);
  $("download-seg").addEventListener("click", downloadSeg);
  $("propagate").addEventListener("click", propagateLoop);
  $("add-object").addEventListener("click", addObject);
  $("help-toggle").addEventListener("click", toggleHelp);
  $("auto").addEventListener("click", requestAutoMask);
  $("gate").addEventListener("input", showGate);
  $("gate").addEventListener("change", () => {
    const s = state.id ? activeObject().frames[state.frame] : null;
    if (s && s.autoShown) requestAutoMask();
  });
  $("modality").addEventListener("change", () => {
    rememberAnatomy($("modality").value);
    const s = state.id ? activeObject().frames[state.frame] : null;
    if (s && s.autoShown) requestAutoMask();
    else if (s && state.locatesTaps && isTap(s)) requestMask();
  });
  for (const id of ["wl-level", "wl-width", "opacity", "outline"]) $(id).addEventListener("input", compose);
  $("wl-reset").addEventListener("click", resetWindow);
  $("spacing").addEventListener("change", remeasure);
  $("frame").addEventListener("input", () => showFrame(Number($("frame").value)));
  $("zoom-in").addEventListener("click", () => zoomBy(1.5));
  $("zoom-out").addEventListener("click", () => zoomBy(1 / 1.5));
  $("zoom-reset").addEventListener("click", resetView);
  window.addEventListener("resize", layout);

  const KEYS = {
    b: () => setMode("box"), p: () => setMode("point"), "+": () => setLabel(1), "-": () => setLabel(0),
    a: requestAutoMask, n: () => state.id && addObject(), Delete: () => deleteObject(),
    o: toggleOutline, r: resetWindow, 0: resetView, g: propagateLoop, h: toggleHelp, "?": toggleHelp,
    ArrowLeft: () => showFrame(state.frame - 1), ArrowRight: () => showFrame(state.frame + 1),
  };

  window.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") { event.preventDefault(); undo(); return; }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (/^[1-9]$/.test(event.key)) { selectObject(Number(event.key) - 1); return; }
    const action = KEYS[event.key];
    if (action) { event.preventDefault(); action(); }
  });

  // A clinician scans one anatomy for hours: the menu starts at the last one chosen in this browser
  // (per server address; storage may be off, as in some private windows).
  const ANATOMY_KEY = "uniultra.anatomy";
  function rememberAnatomy(value) {
    try { localStorage.setItem(ANATOMY_KEY, value); } catch (_) { /* not remembered, nothing else lost */ }
  }
  function rememberedAnatomy() {
    try { return localStorage.getItem(ANATOMY_KEY); } catch (_) { return null; }
  }

  // The Auto button (and a modality choice when there are several) only for a model with that head.
  async function loadModelInfo() {
    try {
      const response = await fetch("/api/health");
      if (!response.ok) return;
      const health = await response.json();
      state.auto = Boolean(health.auto);
      state.modalities = health.modalities || [];
      state.locatesTaps = Boolean(health.locates_taps);
      $("gate").value = health.presence_gate ?? 0; // the model's own gate; none: 0, every answer shown
      state.gate = Number($("gate").value); // as the slider rounds it
    } catch (_) { return; } // the upload will report an unreachable server
    $("auto").hidden = !state.auto;
    $("gate-label").hidden = !state.auto;
    showGate();
    // A tapped object is located only when the user names its anatomy, so the menu starts unnamed.
    const options = state.modalities.map((name) => new Option(name, name));
    if (state.locatesTaps) options.unshift(new Option("not named", ""));
    $("modality").replaceChildren(...options);
    const remembered = rememberedAnatomy();
    if (options.some((option) => option.value === remembered)) $("modality").value = remembered;
    $("modality-label").hidden = !state.auto || state.modalities.length < 2;
    updateButtons();
  }

  updateButtons();
  loadModelInfo();
})();
