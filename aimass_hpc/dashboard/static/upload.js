// aimass dashboard: the upload form of the Models page (a torch .pt state dict or a
// .safetensors file becomes a new version). Injected into the page; values via textContent.
"use strict";
(function () {
  const body = document.body;
  if (body.dataset.page !== "models") return;
  const { el, api, showError } = window.aimass;
  const TYPES = ["", "classifier", "regressor", "language-model", "embedding", "segmentation", "detection", "generative", "other"];
  const box = el("details", null, { id: "upload-box", class: "box" });
  box.append(el("summary", "Upload a model (.pt state dict or .safetensors)"));
  const form = el("form", null, { id: "upload", class: "filters" });
  const file = el("input", null, { type: "file", name: "file", accept: ".pt,.pth,.safetensors", "aria-label": "model file", required: "" });
  const name = el("input", null, { name: "name", placeholder: "model name", "aria-label": "model name", required: "" });
  const type = el("select", null, { name: "type", "aria-label": "model type" });
  for (const t of TYPES) type.append(el("option", t || "type (optional)", { value: t }));
  const tags = el("input", null, { name: "tags", placeholder: "tags, comma separated", "aria-label": "tags" });
  const desc = el("input", null, { name: "description", placeholder: "description", "aria-label": "description" });
  const button = el("button", "Upload", { type: "submit", id: "upload-submit" });
  const status = el("span", null, { id: "upload-status", class: "muted" });
  form.append(file, name, type, tags, desc, button, status);
  box.append(form);
  const h1 = document.querySelector("main h1");
  h1.after(box);
  file.addEventListener("change", () => {
    if (!name.value && file.files.length) name.value = file.files[0].name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]/g, "-");
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!file.files.length) return;
    const f = file.files[0];
    const q = new URLSearchParams({ name: name.value, filename: f.name });
    if (type.value) q.set("type", type.value);
    if (desc.value) q.set("description", desc.value);
    for (const t of tags.value.split(",").map((s) => s.trim()).filter(Boolean)) q.append("tag", t);
    button.disabled = true; status.textContent = "uploading " + f.name + "…";
    try {
      const data = await api("api/models/upload?" + q, { method: "POST", body: f, headers: { "Content-Type": "application/octet-stream" } });
      status.textContent = "imported " + f.name + " as " + data.ref;
      showError(""); form.reset();
    } catch (e) { status.textContent = ""; showError(e.message); }
    button.disabled = false;
  });
})();
