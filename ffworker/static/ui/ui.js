// ffworker dashboard: live updates over one EventSource per page. Without JavaScript the
// pages still show everything as of their loading.
(function () {
  "use strict";

  function open(url, onJob, onEnd) {
    var source = new EventSource(url);
    var live = document.getElementById("live");
    source.addEventListener("open", function () { if (live) { live.textContent = "● live"; } });
    source.addEventListener("job", function (e) { onJob(JSON.parse(e.data)); });
    source.addEventListener("end", function () { source.close(); if (onEnd) { onEnd(); } });
    source.addEventListener("error", function () {
      if (live) { live.textContent = "reconnecting…"; }
      if (source.readyState === EventSource.CLOSED) {  // refused (e.g. 503): try again later
        setTimeout(function () { open(url, onJob, onEnd); }, 5000);
      }
    });
    return source;
  }

  function fragment(html, selector) {
    var template = document.createElement("template");
    template.innerHTML = html.trim();
    return selector ? template.content.querySelector(selector) : template.content.firstElementChild;
  }

  // -- the jobs list --------------------------------------------------------------
  var table = document.getElementById("jobs");
  if (table && table.dataset.stream) {
    var body = table.tBodies[0];
    open(table.dataset.stream, function (job) {
      var row = fragment("<table><tbody>" + job.html + "</tbody></table>", "tr");
      var existing = body.querySelector('tr[data-job-id="' + job.id + '"]');
      if (existing) {
        existing.replaceWith(row);
      } else if (job["new"]) {
        row.classList.add("fresh");
        body.insertBefore(row, body.firstChild);
        var empty = document.getElementById("empty");
        if (empty) { empty.remove(); }
      }
    });
  }

  // -- one job --------------------------------------------------------------------
  var jobBox = document.getElementById("job");
  if (jobBox && jobBox.dataset.stream) {
    var line = document.getElementById("chart-line");
    var points = [];
    var started = null;
    if (jobBox.dataset.started) {  // the run's claim: the chart starts at 0 % there
      started = Date.parse(jobBox.dataset.started) / 1000;
      points.push({ t: started, p: 0 });
    }
    function plot(job) {
      if (job.percent === null || job.percent === undefined || !job.at) { return; }
      var t = Date.parse(job.at) / 1000;
      if (started === null) { started = t; }
      var last = points[points.length - 1];
      if (last && last.t === t) { return; }
      points.push({ t: t, p: job.percent });
      var span = Math.max(1, t - started);
      line.setAttribute("points", points.map(function (pt) {
        return ((pt.t - started) / span * 300).toFixed(1) + "," + (100 - pt.p).toFixed(1);
      }).join(" "));
    }
    open(jobBox.dataset.stream, function (job) {
      var summary = document.getElementById("summary");
      summary.replaceWith(fragment(job.html));
      plot(job);
    }, function () {
      document.getElementById("chart-note").textContent = "The job has ended.";
      // Bring the audit trail up to date without reloading the page.
      fetch(window.location.href, { credentials: "same-origin" }).then(function (r) { return r.text(); })
        .then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var trail = doc.getElementById("trail");
          if (trail) { document.getElementById("trail").replaceWith(trail); }
        });
    });
  }
})();
