// facefuse report viewer: a small WebGL 1 viewer for the report's own .glb files (written for facefuse,
// no third-party code). Reads each face's mesh.glb (embedded as base64), draws it with a headlight, and
// switches colours: photo (texture or vertex colours), shading only, uncertainty heat map, visibility.
// Orbit: drag. Zoom: wheel. Initial colours for every viewer: #view=photo|shading|heat|visibility.
// The page reports its own state on <body data-viewer-status=...> for automated checks.
(function () {
  "use strict";
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); });

  function decodeBase64(text) {
    var bin = atob(text), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  var COMPONENTS = { SCALAR: 1, VEC2: 2, VEC3: 3, VEC4: 4 };
  var TYPES = { 5120: Int8Array, 5121: Uint8Array, 5122: Int16Array, 5123: Uint16Array, 5125: Uint32Array, 5126: Float32Array };

  // Binary glTF: header, JSON chunk, BIN chunk; one mesh, one triangle primitive, tightly packed views.
  function parseGlb(bytes) {
    var view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (view.getUint32(0, true) !== 0x46546c67) throw new Error("not a binary glTF file");
    var offset = 12, doc = null, bin = null;
    while (offset + 8 <= bytes.byteLength) {
      var length = view.getUint32(offset, true), type = view.getUint32(offset + 4, true);
      var chunk = bytes.subarray(offset + 8, offset + 8 + length);
      if (type === 0x4e4f534a) doc = JSON.parse(new TextDecoder().decode(chunk));
      else if (type === 0x004e4942) bin = chunk;
      offset += 8 + length;
    }
    if (!doc || !bin) throw new Error("glb without JSON or BIN chunk");
    function viewBytes(index) {
      var bv = doc.bufferViews[index];
      return bin.subarray(bv.byteOffset || 0, (bv.byteOffset || 0) + bv.byteLength);
    }
    function accessor(index) {
      var acc = doc.accessors[index], size = COMPONENTS[acc.type], Type = TYPES[acc.componentType];
      var bv = doc.bufferViews[acc.bufferView];
      if (bv.byteStride && bv.byteStride !== size * Type.BYTES_PER_ELEMENT) throw new Error("interleaved data");
      var raw = viewBytes(acc.bufferView), start = acc.byteOffset || 0;
      var copy = raw.slice(start, start + acc.count * size * Type.BYTES_PER_ELEMENT);
      return { data: new Type(copy.buffer), size: size, count: acc.count, normalized: !!acc.normalized };
    }
    var prim = doc.meshes[0].primitives[0], attrs = prim.attributes, mesh = {
      positions: accessor(attrs.POSITION), indices: accessor(prim.indices),
      normals: attrs.NORMAL !== undefined ? accessor(attrs.NORMAL) : null,
      colors: attrs.COLOR_0 !== undefined ? accessor(attrs.COLOR_0) : null,
      uvs: attrs.TEXCOORD_0 !== undefined ? accessor(attrs.TEXCOORD_0) : null, image: null
    };
    if (prim.material !== undefined && mesh.uvs) {
      var pbr = doc.materials[prim.material].pbrMetallicRoughness || {};
      if (pbr.baseColorTexture) {
        var img = doc.images[doc.textures[pbr.baseColorTexture.index].source];
        mesh.image = new Blob([viewBytes(img.bufferView)], { type: img.mimeType || "image/png" });
      }
    }
    return mesh;
  }

  // Per-vertex colours in [0, 1] (RGB) from an accessor of bytes or floats, 3 or 4 components.
  function rgbFloats(acc) {
    var out = new Float32Array(acc.count * 3), scale = acc.data instanceof Uint8Array ? 1 / 255 : 1;
    for (var i = 0; i < acc.count; i++)
      for (var c = 0; c < 3; c++) out[i * 3 + c] = acc.data[i * acc.size + c] * scale;
    return out;
  }

  function bytesToRgb(bytes) {
    var out = new Float32Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) out[i] = bytes[i] / 255;
    return out;
  }

  function computeNormals(pos, idx) {
    var n = new Float32Array(pos.length);
    for (var t = 0; t < idx.length; t += 3) {
      var a = idx[t] * 3, b = idx[t + 1] * 3, c = idx[t + 2] * 3;
      var ux = pos[b] - pos[a], uy = pos[b + 1] - pos[a + 1], uz = pos[b + 2] - pos[a + 2];
      var vx = pos[c] - pos[a], vy = pos[c + 1] - pos[a + 1], vz = pos[c + 2] - pos[a + 2];
      var nx = uy * vz - uz * vy, ny = uz * vx - ux * vz, nz = ux * vy - uy * vx;
      [a, b, c].forEach(function (k) { n[k] += nx; n[k + 1] += ny; n[k + 2] += nz; });
    }
    return n;
  }

  // Column-major 4x4 matrices, as WebGL expects.
  function multiply(a, b) {
    var out = new Float32Array(16);
    for (var col = 0; col < 4; col++)
      for (var row = 0; row < 4; row++) {
        var sum = 0;
        for (var k = 0; k < 4; k++) sum += a[k * 4 + row] * b[col * 4 + k];
        out[col * 4 + row] = sum;
      }
    return out;
  }
  function perspective(fovy, aspect, near, far) {
    var f = 1 / Math.tan(fovy / 2), m = new Float32Array(16);
    m[0] = f / aspect; m[5] = f; m[10] = (far + near) / (near - far); m[11] = -1; m[14] = 2 * far * near / (near - far);
    return m;
  }
  function translation(x, y, z) { var m = identity(); m[12] = x; m[13] = y; m[14] = z; return m; }
  function identity() { var m = new Float32Array(16); m[0] = m[5] = m[10] = m[15] = 1; return m; }
  function rotationX(a) { var m = identity(), c = Math.cos(a), s = Math.sin(a); m[5] = c; m[6] = s; m[9] = -s; m[10] = c; return m; }
  function rotationY(a) { var m = identity(), c = Math.cos(a), s = Math.sin(a); m[0] = c; m[2] = -s; m[8] = s; m[10] = c; return m; }

  var VERTEX_SHADER = [
    "attribute vec3 aPosition; attribute vec3 aNormal; attribute vec3 aColor; attribute vec2 aUv;",
    "uniform mat4 uProjection; uniform mat4 uView;",
    "varying vec3 vNormal; varying vec3 vColor; varying vec2 vUv;",
    "void main() {",
    "  vNormal = (uView * vec4(aNormal, 0.0)).xyz; vColor = aColor; vUv = aUv;",
    "  gl_Position = uProjection * uView * vec4(aPosition, 1.0);",
    "}"].join("\n");
  var FRAGMENT_SHADER = [
    "precision mediump float;",
    "uniform sampler2D uTexture; uniform float uUseTexture;",
    "varying vec3 vNormal; varying vec3 vColor; varying vec2 vUv;",
    "void main() {",
    "  vec3 n = normalize(vNormal);",
    "  float light = 0.3 + 0.7 * abs(dot(n, normalize(vec3(-0.3, 0.4, 1.0))));",
    "  vec3 base = uUseTexture > 0.5 ? texture2D(uTexture, vUv).rgb : vColor;",
    "  gl_FragColor = vec4(base * light, 1.0);",
    "}"].join("\n");

  function compile(gl, type, source) {
    var shader = gl.createShader(type);
    gl.shaderSource(shader, source); gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
    return shader;
  }

  var SHADING_GREY = 0.78;
  var BACKGROUND = [0.96, 0.96, 0.97];

  function Viewer(canvas, face, initialMode, onReady) {
    var gl = canvas.getContext("webgl", { preserveDrawingBuffer: false, antialias: true });
    if (!gl) throw new Error("WebGL is not available in this browser");
    var mesh = parseGlb(decodeBase64(face.glb));
    var count = mesh.positions.count, pos = mesh.positions.data;
    var indices = count < 65536 ? new Uint16Array(mesh.indices.data) : mesh.indices.data;
    if (!(indices instanceof Uint16Array) && !gl.getExtension("OES_element_index_uint"))
      throw new Error("this browser cannot draw meshes over 65535 vertices");
    var normals = mesh.normals ? mesh.normals.data : computeNormals(pos, indices);
    var lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
    for (var i = 0; i < count; i++)
      for (var c = 0; c < 3; c++) { lo[c] = Math.min(lo[c], pos[i * 3 + c]); hi[c] = Math.max(hi[c], pos[i * 3 + c]); }
    var centre = [0, 1, 2].map(function (k) { return (lo[k] + hi[k]) / 2; });
    var radius = Math.max(1e-6, Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) / 2);

    var grey = new Float32Array(count * 3).fill(SHADING_GREY);
    var colourSets = { shading: grey };
    if (mesh.colors) colourSets.photo = rgbFloats(mesh.colors);
    if (mesh.image) colourSets.photo = grey;  // the texture supplies the colour
    if (face.heat) colourSets.heat = bytesToRgb(decodeBase64(face.heat));
    if (face.visibility) colourSets.visibility = bytesToRgb(decodeBase64(face.visibility));

    var program = gl.createProgram();
    gl.attachShader(program, compile(gl, gl.VERTEX_SHADER, VERTEX_SHADER));
    gl.attachShader(program, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT_SHADER));
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
    gl.useProgram(program);
    function buffer(target, data) { var b = gl.createBuffer(); gl.bindBuffer(target, b); gl.bufferData(target, data, gl.STATIC_DRAW); return b; }
    function attribute(name, buf, size) {
      var loc = gl.getAttribLocation(program, name);
      if (loc < 0) return;
      gl.bindBuffer(gl.ARRAY_BUFFER, buf); gl.enableVertexAttribArray(loc); gl.vertexAttribPointer(loc, size, gl.FLOAT, false, 0, 0);
    }
    attribute("aPosition", buffer(gl.ARRAY_BUFFER, pos), 3);
    attribute("aNormal", buffer(gl.ARRAY_BUFFER, normals), 3);
    var uvLocation = gl.getAttribLocation(program, "aUv");
    if (mesh.uvs) attribute("aUv", buffer(gl.ARRAY_BUFFER, mesh.uvs.data), 2);
    else if (uvLocation >= 0) gl.vertexAttrib2f(uvLocation, 0, 0);
    var colourBuffers = {};
    Object.keys(colourSets).forEach(function (k) { colourBuffers[k] = buffer(gl.ARRAY_BUFFER, colourSets[k]); });
    var indexBuffer = buffer(gl.ELEMENT_ARRAY_BUFFER, indices);
    var uniforms = {
      projection: gl.getUniformLocation(program, "uProjection"), view: gl.getUniformLocation(program, "uView"),
      useTexture: gl.getUniformLocation(program, "uUseTexture"), texture: gl.getUniformLocation(program, "uTexture")
    };
    gl.uniform1i(uniforms.texture, 0);
    gl.enable(gl.DEPTH_TEST);

    var state = { yaw: 0, pitch: 0, zoom: 1, mode: null, texture: null };
    this.modes = Object.keys(colourSets);
    this.canvas = canvas;

    function draw() {
      var aspect = canvas.width / canvas.height;
      gl.viewport(0, 0, canvas.width, canvas.height);
      gl.clearColor(BACKGROUND[0], BACKGROUND[1], BACKGROUND[2], 1);
      gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
      var distance = radius * 2.6 / state.zoom;
      var view = multiply(translation(0, 0, -distance),
        multiply(rotationX(state.pitch), multiply(rotationY(state.yaw), translation(-centre[0], -centre[1], -centre[2]))));
      gl.uniformMatrix4fv(uniforms.projection, false, perspective(0.7, aspect, distance / 20, distance * 4));
      gl.uniformMatrix4fv(uniforms.view, false, view);
      attribute("aColor", colourBuffers[state.mode], 3);
      var textured = state.mode === "photo" && state.texture !== null;
      gl.uniform1f(uniforms.useTexture, textured ? 1 : 0);
      gl.activeTexture(gl.TEXTURE0);
      gl.bindTexture(gl.TEXTURE_2D, textured ? state.texture : null);
      gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, indexBuffer);
      gl.drawElements(gl.TRIANGLES, indices.length, indices instanceof Uint16Array ? gl.UNSIGNED_SHORT : gl.UNSIGNED_INT, 0);
    }
    var pending = false;
    function redraw() {
      if (pending) return;
      pending = true;
      requestAnimationFrame(function () { pending = false; draw(); });
    }
    this.setMode = function (mode) {
      if (!colourSets[mode]) mode = colourSets.photo ? "photo" : "shading";
      state.mode = mode;
      draw();
      return mode;
    };
    var drag = null;
    canvas.addEventListener("pointerdown", function (e) { drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointerup", function () { drag = null; });
    canvas.addEventListener("pointermove", function (e) {
      if (!drag) return;
      state.yaw += (e.clientX - drag[0]) * 0.01;
      state.pitch = Math.max(-1.5, Math.min(1.5, state.pitch + (e.clientY - drag[1]) * 0.01));
      drag = [e.clientX, e.clientY];
      redraw();
    });
    canvas.addEventListener("wheel", function (e) {
      e.preventDefault();
      state.zoom = Math.max(0.3, Math.min(8, state.zoom * Math.exp(-e.deltaY * 0.001)));
      redraw();
    }, { passive: false });

    var self = this;
    this.setMode(initialMode);
    if (mesh.image) {
      var url = URL.createObjectURL(mesh.image), image = new Image();
      image.onload = function () {
        var tex = gl.createTexture();
        gl.bindTexture(gl.TEXTURE_2D, tex);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, image);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
        URL.revokeObjectURL(url);
        state.texture = tex;
        draw();
        onReady(self);
      };
      image.onerror = function () { errors.push("could not decode the texture of " + face.id); onReady(self); };
      image.src = url;
    } else {
      onReady(self);
    }
  }

  function initialMode() {
    var match = /(?:^|[#&])view=(photo|shading|heat|visibility)/.exec(window.location.hash);
    return match ? match[1] : "photo";
  }

  function start() {
    var data = JSON.parse(document.getElementById("facefuse-faces").textContent);
    var canvases = document.querySelectorAll("canvas[data-face]");
    var viewers = [], ready = 0, failed = 0;
    function finish() {
      if (ready + failed < canvases.length) return;
      var rects = viewers.map(function (v) {
        var r = v.canvas.getBoundingClientRect();
        return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height].map(Math.round).join(" ");
      });
      document.body.setAttribute("data-viewer-rects", rects.join(","));
      document.body.setAttribute("data-viewer-errors", errors.join(" | "));
      document.body.setAttribute("data-viewer-status", errors.length || failed ? "error" : "ready");
    }
    Array.prototype.forEach.call(canvases, function (canvas) {
      var face = data[canvas.getAttribute("data-face")];
      var panel = canvas.closest(".viewer");
      try {
        var viewer = new Viewer(canvas, face, initialMode(), function () { ready++; finish(); });
        viewers.push(viewer);
        var buttons = panel.querySelectorAll("button[data-mode]");
        function select(mode) {
          var shown = viewer.setMode(mode);
          panel.setAttribute("data-mode", shown);
          Array.prototype.forEach.call(buttons, function (b) { b.classList.toggle("on", b.getAttribute("data-mode") === shown); });
        }
        Array.prototype.forEach.call(buttons, function (b) {
          if (viewer.modes.indexOf(b.getAttribute("data-mode")) < 0) b.disabled = true;
          b.addEventListener("click", function () { select(b.getAttribute("data-mode")); });
        });
        select(initialMode());
      } catch (err) {
        failed++;
        errors.push(face.id + ": " + err.message);
        panel.appendChild(document.createTextNode("viewer unavailable: " + err.message));
        finish();
      }
    });
    if (!canvases.length) finish();
  }

  // Sortable tables: click a header; numbers sort as numbers.
  function sortable(table) {
    var headers = table.querySelectorAll("th");
    Array.prototype.forEach.call(headers, function (th, column) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var ascending = th.getAttribute("data-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("data-sort"); });
        th.setAttribute("data-sort", ascending ? "ascending" : "descending");
        rows.sort(function (a, b) {
          var x = a.cells[column].getAttribute("data-value") || a.cells[column].textContent;
          var y = b.cells[column].getAttribute("data-value") || b.cells[column].textContent;
          var nx = parseFloat(x), ny = parseFloat(y);
          var order = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y);
          return ascending ? order : -order;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
    start();
  });
})();
