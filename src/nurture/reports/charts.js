// Draws the report's charts as SVG from the JSON embedded in the page; no library, no network.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const report = data.report;
  const NS = "http://www.w3.org/2000/svg";
  const BLUE = "#2f6fde", ORANGE = "#e8833a", GREEN = "#3a9b5c", GREY = "#9aa5b1";

  function el(name, attributes, parent) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, content, anchor) {
    const node = el("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    node.textContent = content;
    return node;
  }
  function title(node, content) {
    el("title", {}, node).textContent = content;
  }
  // An SVG as wide as the chart's box, measured now that the page is laid out.
  function canvas(id, height) {
    const plot = document.querySelector("#" + id + " .plot");
    const width = Math.max(plot.getBoundingClientRect().width, 320);
    return el("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height }, plot);
  }
  function empty(id, message) {
    const plot = document.querySelector("#" + id + " .plot");
    const note = document.createElement("p");
    note.className = "empty";
    note.textContent = message;
    plot.appendChild(note);
    document.getElementById(id).dataset.marks = "0";
  }
  function done(id, marks) {
    document.getElementById(id).dataset.marks = String(marks);
  }
  const percent = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%");
  const number = (v) => (v === null || v === undefined ? "-" : Number(v).toLocaleString("en"));

  function tiles() {
    const box = document.getElementById("tiles");
    const money = report.money.find((m) => m.currency === data.currency) || {};
    const nps = report.satisfaction.nps;
    const shown = [
      [number(report.customers), "customers who visited"],
      [percent(report.repeat_visit_rate), "repeat-visit rate"],
      [percent(report.churn_rate_per_period), "churn per " + report.period],
      [money.lifetime_value ? number(money.lifetime_value) + " " + data.currency : "-", "lifetime value"],
      [money.retention_cost_per_retained ? number(money.retention_cost_per_retained) + " " + data.currency : "-",
        "cost per retained customer"],
      [percent(report.cancellations.saved_share), "cancellations saved"],
      [nps.score === null ? "-" : (nps.score > 0 ? "+" : "") + nps.score, "NPS"],
      [number(report.slipping_count), "slipping past their rhythm"],
    ];
    for (const [value, caption] of shown) {
      const tile = document.createElement("div");
      tile.className = "tile";
      tile.innerHTML = "<b></b><span></span>";
      tile.firstChild.textContent = value;
      tile.lastChild.textContent = caption;
      box.appendChild(tile);
    }
  }

  function cohorts() {
    const rows = report.cohorts.filter((c) => c.customers > 0);
    if (!rows.length) return empty("cohorts", "No customer had a first visit in these periods.");
    const columns = Math.max(...rows.map((c) => c.retention.length));
    const cell = 26, left = 120, top = 22;
    const svg = canvas("cohorts", top + rows.length * cell + 10);
    const width = Math.min((svg.width.baseVal.value - left) / columns, 70);
    let marks = 0;
    for (let k = 0; k < columns; k++) text(svg, left + k * width + width / 2, 14, "+" + k, "middle");
    rows.forEach((cohort, i) => {
      const y = top + i * cell;
      text(svg, 0, y + 17, cohort.cohort + " (" + number(cohort.customers) + ")");
      cohort.retention.forEach((share, k) => {
        const rect = el("rect", {
          x: left + k * width, y: y, width: width - 2, height: cell - 2, rx: 3,
          fill: BLUE, "fill-opacity": (0.08 + 0.92 * share).toFixed(3), class: "mark",
        }, svg);
        title(rect, cohort.cohort + " +" + k + ": " + percent(share) + " (" + number(cohort.active[k]) + ")");
        const label = text(svg, left + k * width + width / 2 - 1, y + 17, Math.round(100 * share) + "%", "middle");
        if (share > 0.55) label.setAttribute("style", "fill:#fff");
        marks++;
      });
    });
    done("cohorts", marks);
  }

  function lift() {
    const rows = data.lifts;
    if (!rows.length) return empty("lift", "No lift measured yet: it needs sends and their holdouts.");
    const row = 28, left = 150, top = 20;
    const svg = canvas("lift", top + rows.length * row + 24);
    const width = svg.width.baseVal.value - left - 20;
    const values = rows.flatMap((r) => [r.low, r.high, r.lift, 0]).filter((v) => v !== null);
    const lo = Math.min(...values), hi = Math.max(...values);
    const x = (v) => left + ((v - lo) / (hi - lo || 1)) * width;
    el("line", { x1: x(0), x2: x(0), y1: top - 6, y2: top + rows.length * row, stroke: GREY }, svg);
    text(svg, x(0), top - 8, "no effect", "middle");
    let marks = 0;
    rows.forEach((r, i) => {
      const y = top + i * row + row / 2;
      text(svg, 0, y + 4, r.touch);
      if (r.lift === null || !r.conclusive && r.low === null) {
        text(svg, left, y + 4, "too few contacts to tell (" + r.treated + " sent, " + r.held_out + " held out)");
        return;
      }
      const colour = r.conclusive ? GREEN : GREY;
      el("line", { x1: x(r.low), x2: x(r.high), y1: y, y2: y, stroke: colour, "stroke-width": 3, class: "mark" }, svg);
      const dot = el("circle", { cx: x(r.lift), cy: y, r: 5, fill: colour, class: "mark" }, svg);
      title(dot, r.touch + ": " + percent(r.lift) + " [" + percent(r.low) + ", " + percent(r.high) + "]");
      marks++;
    });
    done("lift", marks);
  }

  // Bars for the first series, a line for the second, each on its own scale.
  function barsAndLine(id, bars, line, barLabel, lineLabel) {
    const rows = data.timeline;
    const height = 220, left = 50, right = 50, top = 24, bottom = 30;
    const svg = canvas(id, height);
    const width = svg.width.baseVal.value - left - right;
    const step = width / rows.length;
    const barMax = Math.max(1, ...rows.map(bars)), lineMax = Math.max(1, ...rows.map(line));
    const y = (v, max) => top + (height - top - bottom) * (1 - v / max);
    let marks = 0;
    rows.forEach((r, i) => {
      const rect = el("rect", {
        x: left + i * step + step * 0.15, y: y(bars(r), barMax), width: step * 0.7,
        height: Math.max(y(0, barMax) - y(bars(r), barMax), 0.5), fill: BLUE, class: "mark",
      }, svg);
      title(rect, r.period + ": " + number(bars(r)) + " " + barLabel);
      if (rows.length <= 14 || i % Math.ceil(rows.length / 12) === 0) {
        text(svg, left + i * step + step / 2, height - 12, r.period, "middle");
      }
      marks++;
    });
    const points = rows.map((r, i) => (left + i * step + step / 2) + "," + y(line(r), lineMax)).join(" ");
    el("polyline", { points: points, fill: "none", stroke: ORANGE, "stroke-width": 2.5, class: "mark" }, svg);
    rows.forEach((r, i) => {
      const dot = el("circle", { cx: left + i * step + step / 2, cy: y(line(r), lineMax), r: 3, fill: ORANGE }, svg);
      title(dot, r.period + ": " + number(line(r)) + " " + lineLabel);
    });
    text(svg, left - 6, y(barMax, barMax) + 4, number(Math.round(barMax)), "end");
    text(svg, left + width + 6, y(lineMax, lineMax) + 4, number(Math.round(lineMax)), "start");
    const legend = document.createElement("div");
    legend.className = "legend";
    legend.innerHTML = '<i style="background:' + BLUE + '"></i><span></span><i style="background:' + ORANGE +
      '"></i><span></span>';
    legend.children[1].textContent = barLabel + " (left scale)";
    legend.children[3].textContent = lineLabel + " (right scale)";
    document.querySelector("#" + id + " .plot").appendChild(legend);
    done(id, marks + 1);
  }

  function slipping() {
    const body = document.querySelector("#slipping-table tbody");
    for (const s of report.slipping) {
      const row = document.createElement("tr");
      const cells = [s.name + " (" + s.external_id + ")", s.visits, s.last_visit.slice(0, 10),
        s.usual_interval_days.toFixed(0) + " d", s.days_since.toFixed(0) + " d", percent(s.late_now),
        percent(s.late_week_ago)];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.appendChild(cell);
      }
      body.appendChild(row);
    }
  }

  tiles();
  cohorts();
  lift();
  barsAndLine("activity", (r) => r.sent, (r) => r.visits, "messages sent", "visits");
  barsAndLine("money", (r) => r.revenue, (r) => r.incentive_cost, "revenue", "incentive cost");
  slipping();
  document.body.dataset.drawn = "true";
})();
