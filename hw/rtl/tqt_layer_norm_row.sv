// Integer LayerNorm of one row of D values (docs/integer_only.md, "LayerNorm"), reading the row,
// gamma and beta from synchronous memories (data one cycle after the address):
//   s = sum q,  W = D sum q^2 - s^2 + D^2 eps_q                    (pass 1: D + 1 cycles)
//   k = (2K - bitlength(W)) >>> 1,  D_root = max(isqrt(W << 2k or W >> -2k), 1)   (K + 4 cycles)
//   per element: c = D q - s,  n = div_round(c << (k + F), D_root, R),  y = gamma n + beta,
//                out = clip(shift_round(y, out_shift, R))          (pass 2: N_Q_W + 4 cycles each)
// The export's generator (hw/params.py) proves k + F >= 0 (so the shift is on the numerator),
// |c << (k + F)| < 2^(NUM_W-1) and |n| < 2^N_Q_W for its widths.
// RECIPROCAL = 1 is the cheaper variant (kernels.layer_norm(..., normalization="reciprocal")): one
// division per row, r = R(2^(K+G) / D_root) (0 when W = 0), then per element n = R(c r 2^-(K+G-k-F)),
// a multiply and a rounding shift (2 cycles per element instead of N_Q_W + 5).
module tqt_layer_norm_row #(
    parameter int D = 64,          // the row length
    parameter int ADDR_W = 6,
    parameter int IN_W = 16,       // q: the <ln>/input site (signed)
    parameter int GAMMA_W = 16,
    parameter int BETA_W = 49,
    parameter int EPS_W = 33,      // eps_q: unsigned
    parameter int OUT_W = 16,      // the <ln>/output site (signed)
    parameter int K = 24,
    parameter int F = 16,
    parameter int ROUNDING = 2,
    parameter int S_W = 23,        // s: signed
    parameter int SQ_W = 37,       // sum q^2: unsigned
    parameter int W_W = 43,        // W: unsigned
    parameter int C_W = 23,        // c: signed
    parameter int NUM_W = 44,      // c << (k + F): signed
    parameter int N_Q_W = 20,      // |n| < 2^N_Q_W
    parameter int Y_W = 40,        // y: signed
    parameter int SHIFT_W = 8,     // out_shift: signed, >= -13
    parameter bit RECIPROCAL = 0,
    parameter int G = 24           // the reciprocal's bits beyond K (kernels.LN_RECIPROCAL_G)
) (
    input  logic                      clk,
    input  logic                      rst,
    input  logic                      start,
    input  logic [EPS_W-1:0]          eps_q,
    input  logic signed [SHIFT_W-1:0] out_shift,
    output logic [ADDR_W-1:0]         rd_addr,
    input  logic signed [IN_W-1:0]    rd_q,
    input  logic signed [GAMMA_W-1:0] rd_gamma,
    input  logic signed [BETA_W-1:0]  rd_beta,
    output logic                      out_valid,
    output logic [ADDR_W-1:0]         out_addr,
    output logic signed [OUT_W-1:0]   out_q,
    output logic                      done,
    // the steps, for golden vectors: per row s, W, k, D_root; per element c, n, y (with out_valid)
    output logic signed [S_W-1:0]     row_s,
    output logic [W_W-1:0]            row_w,
    output logic signed [7:0]         row_k,
    output logic [K-1:0]              row_root,
    output logic [G+1:0]              row_r,     // the reciprocal (RECIPROCAL = 1)
    output logic signed [C_W-1:0]     out_c,
    output logic signed [N_Q_W+1:0]   out_n,
    output logic signed [Y_W-1:0]     out_y
);
  typedef enum logic [3:0] {IDLE, SUM, MOMENTS, ROOT, RECIPROCAL_START, RECIPROCAL_WAIT, FETCH, DIVIDE, EMIT} state_t;
  state_t state;

  logic [ADDR_W:0] count;  // pass 1: addresses issued; pass 2: the element
  logic signed [2*IN_W-1:0] q_squared;
  assign q_squared = rd_q * rd_q;
  logic signed [S_W-1:0] s;
  logic [SQ_W-1:0] sq;
  logic [W_W-1:0] w;
  logic signed [7:0] k;
  logic [K-1:0] root;

  // W = D sum q^2 - s^2 + D^2 eps_q in [0, 2^W_W): computed modulo 2^W_W, so exact
  logic signed [W_W-1:0] w_next, s_wide, sq_wide, eps_wide;
  assign s_wide = s;  // sign-extended
  assign sq_wide = sq;  // zero-extended (unsigned)
  assign eps_wide = eps_q;
  assign w_next = D * sq_wide - s_wide * s_wide + D * D * eps_wide;

  // k from W's bit length (a priority encoder), and W' = W 2^2k in [2^(2K-2), 2^2K)
  localparam logic signed [7:0] TWO_K = 8'(2 * K);
  function automatic logic signed [7:0] bit_length(input logic [W_W-1:0] v);
    bit_length = 0;
    for (int j = 0; j < W_W; j++) if (v[j]) bit_length = 8'(j + 1);
  endfunction
  logic signed [7:0] k_next;
  logic [2*K-1:0] w_scaled;
  assign k_next = (TWO_K - bit_length(w)) >>> 1;  // signed: the floor of a negative half
  assign w_scaled = k_next < 0 ? w >> (-2 * k_next) : w << (2 * k_next);  // < 2^2K

  logic sqrt_start, sqrt_done;
  logic [K-1:0] sqrt_root;
  tqt_isqrt #(.ROOT_W(K)) isqrt (.clk(clk), .rst(rst), .start(sqrt_start), .n(w_scaled),
                                 .done(sqrt_done), .root(sqrt_root));

  // pass 2: c = D q - s, the numerator c << (k + F), the division, then gamma n + beta
  logic signed [C_W-1:0] c;
  logic signed [NUM_W-1:0] numerator;
  logic div_start, div_done;
  logic signed [N_Q_W+1:0] n;
  logic signed [Y_W-1:0] y;
  logic signed [NUM_W-1:0] c_wide;
  logic [7:0] up;
  assign c = D * rd_q - s;
  assign c_wide = c;  // sign-extended
  assign up = k + 8'(F);  // >= 0 (the generator's proof)
  assign numerator = c_wide <<< up;
  // the divider: each element's c << (k + F) / D_root, or (RECIPROCAL) once per row 2^(K+G) / D_root
  localparam int DIV_NUM_W = RECIPROCAL ? K + G + 2 : NUM_W;
  localparam int DIV_Q_W = RECIPROCAL ? G + 2 : N_Q_W;  // r <= 2^(G+1) since D_root >= 2^(K-1)
  localparam logic signed [DIV_NUM_W-1:0] RECIPROCAL_NUMERATOR = 1 <<< (K + G);
  logic signed [DIV_NUM_W-1:0] div_a;
  /* verilator lint_off UNUSEDSIGNAL */
  logic signed [DIV_Q_W+1:0] quotient;  // its sign bits are unused where it is r (>= 0)
  /* verilator lint_on UNUSEDSIGNAL */
  assign div_a = RECIPROCAL ? RECIPROCAL_NUMERATOR : numerator;
  tqt_div_round #(.NUM_W(DIV_NUM_W), .DEN_W(K), .Q_W(DIV_Q_W), .ROUNDING(ROUNDING))
      divide (.clk(clk), .rst(rst), .start(div_start), .a(div_a), .b(root), .done(div_done),
              .quotient(quotient));
  // the reciprocal variant's n = R(c r 2^-(K+G-k-F)); the exact unit has none of it
  logic [G+1:0] r, quotient_r;
  assign quotient_r = quotient;  // RECIPROCAL: the quotient is r, G + 2 bits
  if (RECIPROCAL) begin : reciprocal
    logic signed [G+2:0] r_signed;
    logic signed [C_W+G+2:0] product;
    logic [7:0] reciprocal_shift;
    logic [N_Q_W+1:0] n_reciprocal;
    assign r_signed = r;  // zero-extended
    assign product = c * r_signed;
    assign reciprocal_shift = 8'(K + G) - up;  // K + G - k - F >= G - F > 0
    tqt_shift_round #(.IN_W(C_W + G + 3), .OUT_W(N_Q_W + 2), .OUT_SIGNED(1), .ROUNDING(ROUNDING), .SHIFT_W(8))
        normalize (.q(product), .shift(reciprocal_shift), .out(n_reciprocal));
    assign n = n_reciprocal;
  end else begin : exact
    assign n = quotient[N_Q_W+1:0];
  end
  assign y = rd_gamma * n + rd_beta;  // all signed: extended to Y_W first
  logic [OUT_W-1:0] rounded;
  tqt_shift_round #(.IN_W(Y_W), .OUT_W(OUT_W), .OUT_SIGNED(1), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W),
                    .MAX_LEFT(13))
      requantize (.q(y), .shift(out_shift), .out(rounded));

  assign rd_addr = count[ADDR_W-1:0];
  assign row_s = s;
  assign row_w = w;
  assign row_k = k;
  assign row_root = root;
  assign row_r = r;

  always_ff @(posedge clk) begin
    done <= 0;
    out_valid <= 0;
    sqrt_start <= 0;
    div_start <= 0;
    if (rst) begin
      state <= IDLE;
      count <= '0;
    end else begin
      case (state)
        IDLE: if (start) begin
          state <= SUM;
          count <= '0;
          s <= '0;
          sq <= '0;
        end
        SUM: begin  // address `count` issued now, the data of `count - 1` arrives
          if (count != 0) begin
            s <= s + S_W'(rd_q);
            sq <= sq + SQ_W'(q_squared);
          end
          if (count == D) state <= MOMENTS;
          else count <= count + 1;
        end
        MOMENTS: begin
          w <= w_next;
          state <= ROOT;
          sqrt_start <= 1;
          count <= '0;
        end
        ROOT: begin
          k <= k_next;
          if (sqrt_done) begin
            root <= sqrt_root == 0 ? K'(1) : sqrt_root;
            state <= RECIPROCAL ? RECIPROCAL_START : FETCH;
          end
        end
        RECIPROCAL_START: begin
          div_start <= 1;
          state <= RECIPROCAL_WAIT;
        end
        RECIPROCAL_WAIT: if (div_done) begin
          r <= w == 0 || !RECIPROCAL ? '0 : quotient_r;
          state <= FETCH;
        end
        FETCH: begin  // the element's q, gamma and beta arrive in this cycle's data
          div_start <= !RECIPROCAL;
          state <= RECIPROCAL ? EMIT : DIVIDE;
        end
        DIVIDE: if (div_done) state <= EMIT;
        EMIT: begin
          out_valid <= 1;
          out_addr <= count[ADDR_W-1:0];
          out_q <= rounded;
          out_c <= c;
          out_n <= n;
          out_y <= y;
          if (count == D - 1) begin
            state <= IDLE;
            done <= 1;
          end else begin
            count <= count + 1;
            state <= FETCH;
          end
        end
        default: state <= IDLE;
      endcase
    end
  end
endmodule
