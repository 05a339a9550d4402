function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}
function tokenHeatmap(tokens, activations, peak, focus) {
  const line = element("div", null, "context");
  tokens.forEach((token, i) => {
    const span = element("span", token, "token" + (i === focus ? " focus" : ""));
    const a = activations[i];
    span.style.background = "rgba(255,120,0," + Math.min(1, Math.max(0, a) / peak).toFixed(3) + ")";
    span.title = "activation " + a.toFixed(3);
    line.appendChild(span);
  });
  return line;
}