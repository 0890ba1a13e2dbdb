// The sagaworks dashboard's only script: the API token (kept in this tab's sessionStorage, sent as
// a bearer header, never in a URL or cookie), JSON bodies for the API's actions, confirmations
// that read the current undo plan, and the alert area that shows the API's answer.
(function () {
  "use strict";
  var KEY = "sagaworks.token";

  function say(kind, text) {
    var box = document.getElementById("alert");
    box.className = "alert " + kind;
    box.textContent = text;
    box.hidden = false;
  }

  document.addEventListener("DOMContentLoaded", function () {
    var field = document.getElementById("token");
    if (!field) return;
    field.value = sessionStorage.getItem(KEY) || "";
    field.addEventListener("input", function () {
      if (field.value.trim()) sessionStorage.setItem(KEY, field.value.trim());
      else sessionStorage.removeItem(KEY);
    });
  });

  htmx.defineExtension("saga-api", {
    onEvent: function (name, evt) {
      if (name !== "htmx:configRequest") return true;
      var d = evt.detail, form = d.elt, token = sessionStorage.getItem(KEY);
      if (token) d.headers["Authorization"] = "Bearer " + token;
      d.headers["Content-Type"] = "application/json";
      d.headers["Accept"] = "application/json";
      if (form.dataset.action === "send") {
        var payload = (d.parameters.get("payload") || "").trim();
        try {
          var data = payload ? JSON.parse(payload) : {};
          if (data === null || typeof data !== "object" || Array.isArray(data)) throw new Error();
        } catch (e) {
          say("error", "The payload must be a JSON object, such as {\"by\": \"operator\"}.");
          return false;
        }
        d.path = form.dataset.base + encodeURIComponent(d.parameters.get("event").trim());
      }
      return true;
    },
    encodeParameters: function (xhr, parameters, form) {
      var action = form.dataset.action;
      if (action === "send") return (parameters.get("payload") || "").trim() || "{}";
      var reason = action === "cancel" ? (parameters.get("reason") || "").trim() : "";
      return JSON.stringify(reason ? { reason: reason } : {});
    },
  });

  document.addEventListener("htmx:confirm", function (evt) {
    var source = evt.detail.elt.dataset.confirmFrom;
    var question = source && document.getElementById(source);
    if (!question) return;
    evt.preventDefault();
    if (window.confirm(question.textContent.trim())) evt.detail.issueRequest(true);
  });

  // The saga page redraws its live part every 2 s: keep open what the operator opened there.
  var opened = [];
  document.addEventListener("htmx:beforeSwap", function (evt) {
    if (evt.detail.target.id !== "live") return;
    opened = Array.prototype.map.call(evt.detail.target.querySelectorAll("details[open]"), function (d) {
      return d.dataset.key;
    });
  });
  document.addEventListener("htmx:afterSettle", function () {
    opened.forEach(function (key) {
      var details = document.querySelector('#live details[data-key="' + key + '"]');
      if (details) details.open = true;
    });
    opened = [];
  });

  document.addEventListener("htmx:afterRequest", function (evt) {
    var form = evt.detail.elt, xhr = evt.detail.xhr, body = null;
    if (!form.dataset.action) return;
    try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
    if (evt.detail.successful) {
      var before = form.closest("[data-state]").dataset.state;
      say("ok", form.dataset.done + (body && body.state ? " The saga went from " + before + " to " + body.state + "." : ""));
      htmx.trigger(document.body, "saga-changed");
    } else if (!xhr.status) {
      say("error", "The server did not answer; try again.");
    } else {
      var title = (body && body.title) || xhr.statusText, detail = body && body.detail;
      var hint = xhr.status === 401 ? " Check the API token at the top right." : "";
      say("error", (xhr.status + " " + title + (detail ? ": " + detail : "")).replace(/\.$/, "") + "." + hint);
    }
  });
})();
