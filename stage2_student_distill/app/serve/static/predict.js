// Drag and drop for the Predict page; without JavaScript the file chooser and button still work.
document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop"), input = document.getElementById("image");
  if (!drop || !input) return;
  const form = input.form;
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (!e.dataTransfer.files.length) return;
    input.files = e.dataTransfer.files;
    form.submit();
  });
  input.addEventListener("change", () => { if (input.files.length) form.submit(); });
});
